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
