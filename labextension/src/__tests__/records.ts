import { IKernelRecord } from '../types';

export const GiB = 1024 ** 3;

/** A resident kernel record of ada's, as the pool API gives it; ``overrides`` change fields. */
export function kernelRecord(id: string, overrides: Partial<IKernelRecord> = {}): IKernelRecord {
  return {
    kernel_id: id,
    user: 'ada',
    notebook: `/work/${id}.ipynb`,
    state: 'resident',
    device: 0,
    home: 0,
    gpu_bytes: 2 * GiB,
    booked_bytes: 2 * GiB,
    host_bytes: 0,
    disk_bytes: 0,
    pinned: false,
    last_activity: 0,
    peak_bytes: 2 * GiB,
    lease: null,
    offload_refused: null,
    ...overrides
  };
}
