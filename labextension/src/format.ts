/**
 * Pure formatting helpers: sizes, rates, durations and the one-line status of a kernel.
 *
 * Sizes are binary (GiB, as the server's `format_size` and the CLI print them); transfer rates
 * are decimal GB/s, as PCIe and the design's measurements quote them.
 */

import type {
  IActivity,
  IKernelRecord,
  IStateEvent,
  KernelState
} from './types';

const KIB = 1024;
const UNITS: [string, number][] = [
  ['TiB', KIB ** 4],
  ['GiB', KIB ** 3],
  ['MiB', KIB ** 2],
  ['KiB', KIB]
];

/**
 * Bytes for people: "12.1 GiB", "512 MiB", "0 B". One decimal below 100 of a unit, dropped
 * when it is zero ("2 GiB", not "2.0 GiB").
 */
export function formatBytes(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined || !isFinite(bytes)) {
    return '—';
  }
  const n = Math.max(0, bytes);
  for (const [name, factor] of UNITS) {
    if (n >= factor) {
      const value = n / factor;
      const text = value >= 100 ? value.toFixed(0) : value.toFixed(1);
      return `${text.replace(/\.0$/, '')} ${name}`;
    }
  }
  return `${Math.round(n)} B`;
}

/** A transfer rate in decimal GB/s ("54.2 GB/s"), or "—" when it cannot be known. */
export function formatRate(
  bytes: number | null | undefined,
  seconds: number | null | undefined
): string {
  const rate = transferRate(bytes, seconds);
  if (rate === null) {
    return '—';
  }
  const gbps = rate / 1e9;
  if (gbps >= 100) {
    return `${gbps.toFixed(0)} GB/s`;
  }
  if (gbps >= 0.1) {
    return `${gbps.toFixed(1)} GB/s`;
  }
  return `${(rate / 1e6).toFixed(1)} MB/s`;
}

/** Bytes per second, or null without bytes or a positive duration. */
export function transferRate(
  bytes: number | null | undefined,
  seconds: number | null | undefined
): number | null {
  if (!bytes || !seconds || seconds <= 0 || !isFinite(seconds)) {
    return null;
  }
  return bytes / seconds;
}

/** "0.41 s", "5.4 s", "2 min 3 s", "1 h 2 min". */
export function formatDuration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) {
    return '—';
  }
  const s = Math.max(0, seconds);
  if (s < 1) {
    return `${s.toFixed(2)} s`;
  }
  if (s < 10) {
    return `${s.toFixed(1)} s`;
  }
  if (s < 60) {
    return `${Math.round(s)} s`;
  }
  if (s < 3600) {
    const m = Math.floor(s / 60);
    const rest = Math.round(s - m * 60);
    return rest ? `${m} min ${rest} s` : `${m} min`;
  }
  const h = Math.floor(s / 3600);
  const m = Math.round((s - h * 3600) / 60);
  return m ? `${h} h ${m} min` : `${h} h`;
}

/** GPU-seconds as hours with two decimals ("2.10 h"). */
export function formatHours(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) {
    return '—';
  }
  return `${(Math.max(0, seconds) / 3600).toFixed(2)} h`;
}

/** "just now", "42 s ago", "5 min ago", "3 h ago". */
export function formatAgo(then: number, now: number): string {
  const s = Math.max(0, now - then);
  if (s < 5) {
    return 'just now';
  }
  if (s < 60) {
    return `${Math.round(s)} s ago`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)} min ago`;
  }
  if (s < 86400) {
    return `${Math.floor(s / 3600)} h ago`;
  }
  return `${Math.floor(s / 86400)} d ago`;
}

/** The file name of a notebook path ("/home/a/work/train.ipynb" -> "train.ipynb"). */
export function notebookName(path: string | null | undefined): string {
  if (!path) {
    return '';
  }
  const parts = path.split(/[\\/]/).filter(Boolean);
  return parts.length ? parts[parts.length - 1] : path;
}

/** A short, readable name for a kernel: its notebook, else the first 8 characters of its id. */
export function kernelName(record: Pick<IKernelRecord, 'notebook' | 'kernel_id'>): string {
  return notebookName(record.notebook) || record.kernel_id.slice(0, 8);
}

/** The words a person reads for a state. */
export const STATE_LABELS: Record<KernelState, string> = {
  cold: 'no GPU state',
  queued: 'queued',
  restoring: 'restoring',
  running: 'running',
  resident: 'resident',
  offloading: 'offloading',
  offloaded: 'offloaded',
  spilled: 'spilled to disk',
  error: 'error'
};

/** States in which data moves and a progress indication is shown. */
export const TRANSITIONAL_STATES: ReadonlySet<string> = new Set([
  'restoring',
  'offloading'
]);

/** States in which the kernel's state is on a device. */
export const ON_DEVICE_STATES: ReadonlySet<string> = new Set([
  'running',
  'resident',
  'restoring',
  'offloading'
]);

/** States from which a restore makes sense. */
export const OFF_DEVICE_STATES: ReadonlySet<string> = new Set([
  'offloaded',
  'spilled'
]);

export function stateLabel(state: string): string {
  return (STATE_LABELS as Record<string, string>)[state] ?? state;
}

/** The bytes a kernel's state occupies where it is now. */
export function kernelBytes(record: IKernelRecord): number {
  if (OFF_DEVICE_STATES.has(record.state)) {
    return (record.host_bytes || 0) + (record.disk_bytes || 0);
  }
  return Math.max(record.gpu_bytes || 0, record.booked_bytes || 0);
}

/** What the status bar shows for a kernel. */
export interface IKernelStatus {
  /** The short text: "GPU 1 · resident · 12.1 GiB". */
  text: string;
  /** A full sentence for the tooltip and the accessible label. */
  label: string;
  /** The kernel's state, or "none" when it is not in the pool. */
  state: string;
  /** Whether data is moving (restoring, offloading): show progress. */
  busy: boolean;
}

/**
 * The status of a kernel in one line.
 *
 * @param record the kernel's record, or null when the kernel is not in the pool
 * @param queuePosition its place in the queue (1 is next), if it waits
 */
export function kernelStatus(
  record: IKernelRecord | null | undefined,
  queuePosition?: number | null
): IKernelStatus {
  if (!record) {
    return {
      text: 'GPU pool: —',
      label: 'This kernel is not in the GPU pool',
      state: 'none',
      busy: false
    };
  }
  const device = record.device;
  const onDevice = device !== null && device !== undefined;
  const where = onDevice ? `GPU ${device}` : '';
  const size = kernelBytes(record);
  const sized = (text: string) => (size > 0 ? `${text} · ${formatBytes(size)}` : text);
  const pinned = record.pinned ? ' (pinned)' : '';
  let text: string;
  let label: string;
  switch (record.state) {
    case 'resident':
    case 'running':
      text = sized(`${where || 'GPU'} · ${record.state}`);
      label = `Kernel ${record.state} on ${where || 'a GPU'}${
        size ? `, ${formatBytes(size)} of GPU memory` : ''
      }${pinned}`;
      break;
    case 'queued': {
      const pos = queuePosition ?? null;
      text = pos ? `queued #${pos}` : 'queued';
      label = pos
        ? `Kernel waiting for a GPU, number ${pos} in the queue`
        : 'Kernel waiting for a GPU';
      break;
    }
    case 'restoring':
      text = onDevice ? `restoring… → ${where}` : 'restoring…';
      label = `Kernel state being restored${onDevice ? ` onto ${where}` : ''}${
        size ? ` (${formatBytes(size)})` : ''
      }`;
      break;
    case 'offloading':
      text = 'offloading…';
      label = `Kernel state being offloaded off ${where || 'the GPU'}${
        size ? ` (${formatBytes(size)})` : ''
      }`;
      break;
    case 'offloaded':
      text = sized('offloaded');
      label = `Kernel offloaded to host memory${
        size ? `, ${formatBytes(size)}` : ''
      }; it is restored when its next GPU cell starts`;
      break;
    case 'spilled':
      text = sized('spilled');
      label = `Kernel state spilled to disk${
        size ? `, ${formatBytes(size)}` : ''
      }; it is restored when its next GPU cell starts`;
      break;
    case 'cold':
      text = 'GPU · not used';
      label = 'Kernel in the GPU pool; it has not used a GPU yet';
      break;
    case 'error':
      text = 'GPU · error';
      label = 'The kernel\u2019s GPU state is in error; see the GPU pool panel';
      break;
    default:
      text = `GPU · ${record.state}`;
      label = `Kernel ${record.state}`;
  }
  return {
    text: text + (record.pinned ? ' · pinned' : ''),
    label: `GPU pool: ${label}`,
    state: record.state,
    busy: TRANSITIONAL_STATES.has(record.state)
  };
}

/**
 * Estimated progress (0–1) of a transfer that started `elapsed` seconds ago, from the bytes to
 * move and a previously measured rate; null when there is nothing to estimate from. It never
 * reaches 1 on its own: the end is known only when the server says so.
 */
export function estimateProgress(
  bytes: number | null | undefined,
  elapsed: number,
  rate: number | null | undefined
): number | null {
  if (!bytes || !rate || rate <= 0 || elapsed < 0) {
    return null;
  }
  const expected = bytes / rate;
  return Math.min(0.95, elapsed / expected);
}

/**
 * Recent offloads, restores and migrations of one kernel, newest first, from its state changes.
 *
 * Each transfer is the pair "→ offloading … offloading →" (or "→ restoring … restoring →"). Its
 * duration and size come from the closing event's `duration` and `nbytes` when the server
 * measured them; otherwise the duration is the time between the two events, and the size of the
 * latest transfer is taken from the kernel's record (host bytes after an offload, GPU bytes after
 * a restore). A restore onto another device than the one the state was offloaded from is a
 * migration.
 */
export function kernelActivity(
  record: IKernelRecord,
  events: IStateEvent[]
): IActivity[] {
  const ordered = [...events].sort((a, b) => a.time - b.time || (a.id ?? 0) - (b.id ?? 0));
  const found: IActivity[] = [];
  let started: IStateEvent | null = null;
  let lastDevice: number | null = null;
  for (const event of ordered) {
    if (event.new_state === 'offloading' || event.new_state === 'restoring') {
      if (event.new_state === 'offloading' && event.device_index !== null) {
        lastDevice = event.device_index;
      }
      started = event;
      continue;
    }
    if (started && event.old_state === started.new_state) {
      const offload = started.new_state === 'offloading';
      const duration =
        event.duration ?? (event.time - started.time >= 0 ? event.time - started.time : null);
      const device = offload
        ? started.device_index ?? lastDevice
        : event.device_index ?? started.device_index;
      const from = offload ? device : lastDevice;
      const failed = offload
        ? !OFF_DEVICE_STATES.has(event.new_state)
        : event.new_state === 'error';
      let kind: IActivity['kind'] = offload ? 'offload' : 'restore';
      if (!offload && from !== null && device !== null && from !== device) {
        kind = 'migration';
      }
      found.push({
        kernel_id: record.kernel_id,
        notebook: record.notebook,
        kind,
        time: event.time,
        duration,
        bytes: event.nbytes ?? null,
        from: offload ? device : from,
        to: offload ? null : device,
        failed,
        reason: event.reason
      });
      if (!offload && device !== null) {
        lastDevice = device;
      }
    }
    started = null;
  }
  found.reverse();
  // The newest transfer of each kind may borrow its size from the record.
  const latestOffload = found.find(a => a.kind === 'offload');
  if (latestOffload && latestOffload.bytes === null && !latestOffload.failed) {
    const moved = (record.host_bytes || 0) + (record.disk_bytes || 0);
    latestOffload.bytes = moved || null;
  }
  const latestRestore = found.find(a => a.kind !== 'offload');
  if (
    latestRestore &&
    latestRestore.bytes === null &&
    !latestRestore.failed &&
    record.state !== 'offloaded' &&
    record.state !== 'spilled'
  ) {
    latestRestore.bytes = record.gpu_bytes || null;
  }
  return found;
}

/** A readable message from anything thrown by a request. */
export function errorMessage(error: unknown): string {
  if (error && typeof error === 'object' && 'message' in error) {
    const message = (error as { message: unknown }).message;
    if (typeof message === 'string' && message) {
      return message;
    }
  }
  return String(error);
}
