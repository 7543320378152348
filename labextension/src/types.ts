/**
 * The records of the server's REST API (`/singularity/api/...`) and events, as TypeScript types.
 *
 * They mirror `Kernel.to_dict`, `BrokerCore.snapshot` and `BrokerService.pool/kernel/quota` on the
 * server, and the jupyter_events schemas under `https://events.jupyter.org/jupyter_singularity/`.
 */

export type KernelState =
  | 'cold'
  | 'queued'
  | 'restoring'
  | 'running'
  | 'resident'
  | 'offloading'
  | 'offloaded'
  | 'spilled'
  | 'error';

export interface IDevice {
  index: number;
  uuid: string;
  name: string;
  chip: string;
  total_bytes: number;
  booked_bytes: number;
}

export interface ILease {
  request_id: string;
  device: number;
  reservation: number;
  start: number;
}

export interface IKernelRecord {
  kernel_id: string;
  user: string;
  notebook: string;
  state: KernelState | string;
  device: number | null;
  home?: number | null;
  gpu_bytes: number;
  booked_bytes?: number;
  host_bytes: number;
  disk_bytes: number;
  pinned: boolean;
  last_activity: number;
  peak_bytes?: number | null;
  lease?: ILease | null;
  offload_refused?: string | null;
  /** Pinned host memory the pool lets this kernel keep for its offloads. */
  pool_allowance?: number;
}

/** One row of the ledger's state changes, as `GET /singularity/api/kernels/{id}` returns them. */
export interface IStateEvent {
  id?: number;
  time: number;
  kernel_id: string;
  user: string;
  old_state: string | null;
  new_state: string;
  reason: string;
  device_index: number | null;
  nbytes?: number | null;
  duration?: number | null;
}

export interface IKernelDetail extends IKernelRecord {
  events: IStateEvent[];
}

export interface IQueueEntry {
  kernel_id: string;
  request_id: string;
  position: number;
  reason: string;
  memory: number | null;
  device: number | null;
}

export interface IPool {
  devices: IDevice[];
  kernels: IKernelRecord[];
  queue: IQueueEntry[];
  time: number;
  inventory?: { kind: string; simulated: boolean; reason: string };
}

export interface ILimits {
  gpu_memory: number | null;
  gpu_seconds_per_day: number | null;
  max_resident_kernels: number | null;
  host_memory: number | null;
  priority: number;
}

export interface IQuota {
  user: string;
  limits: ILimits;
  usage: {
    gpu_seconds_today: number;
    gpu_bytes: number;
    host_bytes: number;
    resident_kernels: number;
  };
}

/** Who asks, as `GET /singularity/api/me` answers. */
export interface IMe {
  /** The user whose kernels are mine here: the `user` of their records and of my quota. */
  user: string;
  /** Who asks, as the pool's records name them: under JupyterHub the Hub user, else `user`. */
  username: string;
  /** Whether I may act on every user's kernel and change the quotas. */
  admin: boolean;
}

export interface IQuotas {
  quotas: Record<string, Record<string, unknown>>;
  source: string;
  error: string | null;
}

/** An offload, restore or migration of a kernel, derived from its state changes. */
export interface IActivity {
  kernel_id: string;
  notebook: string;
  kind: 'offload' | 'restore' | 'migration';
  /** When it finished (epoch seconds). */
  time: number;
  duration: number | null;
  bytes: number | null;
  /** Device the state left (offload, migration). */
  from: number | null;
  /** Device the state arrived on (restore, migration). */
  to: number | null;
  /** Whether it ended without the state arriving. */
  failed: boolean;
  reason: string;
}

/** An event from `/api/events/subscribe`, as `@jupyterlab/services`' EventManager emits it. */
export interface IServerEvent {
  schema_id: string;
  [key: string]: unknown;
}

/** The schema ids of the pool's events start with this. */
export const EVENTS_URI = 'https://events.jupyter.org/jupyter_singularity/';
export const KERNEL_STATE_SCHEMA = `${EVENTS_URI}kernel_state/v1`;
export const LEASE_SCHEMA = `${EVENTS_URI}lease/v1`;
export const QUEUE_SCHEMA = `${EVENTS_URI}queue/v1`;

/** A lease in `GET /singularity/api/timeline`: one GPU cell's hold on a device. */
export interface ITimelineLease {
  lease_id: string;
  kernel_id: string;
  user: string;
  device: number;
  /** Epoch seconds. */
  start: number;
  /** Epoch seconds, or null while the cell still runs. */
  end: number | null;
  peak_bytes: number | null;
  reservation_bytes: number;
}

/**
 * `GET /singularity/api/timeline?since=&until=`: the leases overlapping the window and the state
 * changes that start or end an offload or a restore in it, oldest first. A kernel's notebook is
 * empty when it left the pool, or when it is another user's and I am no admin.
 */
export interface ITimeline {
  since: number;
  until: number;
  now: number;
  devices: { index: number; name: string }[];
  leases: ITimelineLease[];
  changes: IStateEvent[];
  kernels: Record<string, { user: string; notebook: string }>;
  /** Whether older records were left out (more than the server answers at once). */
  truncated: boolean;
}

/** GPU time of one user or group, today and over the days asked for. */
export interface IGpuTimeTotal {
  gpu_seconds_today: number;
  gpu_seconds: number;
}

/**
 * `GET /singularity/api/gpu-time?days=`: my GPU-seconds on each UTC day (oldest first, today
 * last) against my daily limit; for an admin also every user's and every group's the quotas name.
 */
export interface IGpuTime {
  user: string;
  now: number;
  gpu_seconds_per_day: number | null;
  /** `day` is the UTC midnight that starts it, in epoch seconds. */
  days: { day: number; gpu_seconds: number }[];
  users?: (IGpuTimeTotal & { user: string })[];
  groups?: (IGpuTimeTotal & { group: string; members: string[] })[];
}
