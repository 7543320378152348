/**
 * The pool model: what the panel and the status bar show, kept up to date from the server.
 *
 * It is a plain class: it fetches the pool, who I am (and whether an admin), my quota and my
 * kernels' recent state changes through an {@link IPoolAPI}, patches itself from the server's
 * events as they arrive, and refreshes (debounced) after each one. It knows nothing of widgets,
 * so the tests drive it directly.
 */

import { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import type { IPoolAPI } from './api';
import {
  errorMessage,
  kernelActivity,
  kernelName,
  OFF_DEVICE_STATES,
  transferRate
} from './format';
import { coalesce } from './refresh';
import {
  EVENTS_URI,
  IActivity,
  IDevice,
  IKernelDetail,
  IKernelRecord,
  IMe,
  IPool,
  IQuota,
  IQuotas,
  IServerEvent,
  KERNEL_STATE_SCHEMA
} from './types';

/** One kernel's share of a device's memory bar. */
export interface ISegment {
  kernel: IKernelRecord;
  bytes: number;
  /** bytes / device total, 0–1. */
  fraction: number;
}

/** A quota gauge: a value against a limit (or against a scale when unlimited). */
export interface IGauge {
  value: number;
  limit: number | null;
  /** Filled fraction of the bar, 0–1. */
  fraction: number;
  /** Whether the value is at or over its limit. */
  full: boolean;
}

/** An action of the user that the server refused, with its words. */
export interface IActionError {
  kernelId: string;
  action: string;
  message: string;
}

export namespace PoolModel {
  export interface IOptions {
    /** Milliseconds to wait after an event before refreshing, to merge a burst (default 150). */
    debounce?: number;
    /** At most this many of my kernels' histories are fetched on each refresh (default 20). */
    detailLimit?: number;
    /** Seconds since the epoch, for progress estimates (default: Date.now() / 1000). */
    clock?: () => number;
    /**
     * The current notebook path of a kernel, where the frontend knows it (its session). The
     * server's record keeps the path the kernel started with, which a rename makes stale.
     */
    notebookPath?: (kernelId: string) => string | null | undefined;
  }
}

export class PoolModel implements IDisposable {
  constructor(
    readonly api: IPoolAPI,
    options: PoolModel.IOptions = {}
  ) {
    this._debounce = options.debounce ?? 150;
    this._detailLimit = options.detailLimit ?? 20;
    this._clock = options.clock ?? (() => Date.now() / 1000);
    this._notebookPath = options.notebookPath ?? (() => null);
  }

  /** Emitted whenever anything shown may have changed. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  /** The last pool snapshot, or null before the first answer. */
  get pool(): IPool | null {
    return this._pool;
  }

  /** My limits and usage, or null when unknown. */
  get quota(): IQuota | null {
    return this._quota;
  }

  /** Who I am, as the server last said, or null when unknown. */
  get me(): IMe | null {
    return this._me;
  }

  /** The user the server runs for (the owner of "my" kernels). */
  get user(): string | null {
    return this._me?.user ?? this._quota?.user ?? null;
  }

  /**
   * Whether the server said I am an admin (may act on every user's kernel and change the
   * quotas). False until it says so.
   */
  get isAdmin(): boolean {
    return this._me?.admin === true;
  }

  /** Why the last refresh failed, or null when it succeeded. */
  get error(): string | null {
    return this._error;
  }

  /** The last refused action, until the next action or {@link clearActionError}. */
  get actionError(): IActionError | null {
    return this._actionError;
  }

  /** Whether a first answer has arrived. */
  get loaded(): boolean {
    return this._pool !== null;
  }

  get devices(): IDevice[] {
    return this._pool?.devices ?? [];
  }

  get kernels(): IKernelRecord[] {
    return this._pool?.kernels ?? [];
  }

  /** Seconds since the epoch, by this model's clock. */
  now(): number {
    return this._clock();
  }

  clearActionError(): void {
    if (this._actionError) {
      this._actionError = null;
      this._changed.emit();
    }
  }

  kernel(kernelId: string | null | undefined): IKernelRecord | null {
    if (!kernelId) {
      return null;
    }
    return this.kernels.find(k => k.kernel_id === kernelId) ?? null;
  }

  /** The notebook of a kernel: its session's current path if known, else the server's. */
  notebook(record: Pick<IKernelRecord, 'kernel_id' | 'notebook'>): string {
    return this._notebookPath(record.kernel_id) || record.notebook || '';
  }

  /** A short name for a kernel: its notebook's file name, else its short id. */
  displayName(record: Pick<IKernelRecord, 'kernel_id' | 'notebook'>): string {
    return kernelName({ kernel_id: record.kernel_id, notebook: this.notebook(record) });
  }

  /** Tell the views that something outside the pool (a session's path) changed. */
  touch(): void {
    if (!this._disposed) {
      this._changed.emit();
    }
  }

  detail(kernelId: string): IKernelDetail | null {
    return this._details.get(kernelId) ?? null;
  }

  /** The kernel's place in the queue (1 is next), or null when it does not wait. */
  queuePosition(kernelId: string): number | null {
    const entry = this._pool?.queue.find(q => q.kernel_id === kernelId);
    return entry ? entry.position : null;
  }

  /** Whether a kernel is mine; every kernel counts as mine while I do not know who I am. */
  isMine(record: IKernelRecord): boolean {
    return this.user === null || record.user === this.user;
  }

  /**
   * Whether the server would let me offload, restore or pin this kernel: my own, or anyone's
   * for an admin. (The server checks again; this only keeps refused buttons out of sight.)
   */
  canAct(record: IKernelRecord): boolean {
    return this.isAdmin || this.isMine(record);
  }

  /** The action in flight for a kernel ("offload", "restore", "pin"), if any. */
  pending(kernelId: string): string | null {
    return this._pending.get(kernelId) ?? null;
  }

  /** The kernels whose state is on a device, each with its share of the device's memory. */
  segments(device: IDevice): ISegment[] {
    const total = device.total_bytes || 1;
    return this.kernels
      .filter(k => k.device === device.index)
      .map(kernel => {
        const bytes = Math.max(kernel.booked_bytes ?? 0, kernel.gpu_bytes ?? 0);
        return { kernel, bytes, fraction: Math.min(1, bytes / total) };
      })
      .sort(
        (a, b) => b.bytes - a.bytes || a.kernel.kernel_id.localeCompare(b.kernel.kernel_id)
      );
  }

  /**
   * A colour slot (0–5) per kernel: its rank among the pool's kernels by id, so kernels side by
   * side on a device get different colours and keep them across refreshes.
   */
  colourSlot(kernelId: string): number {
    const ids = this.kernels.map(k => k.kernel_id).sort();
    const rank = ids.indexOf(kernelId);
    return (rank < 0 ? 0 : rank) % 6;
  }

  /** Kernels with no state on any device (cold, queued, offloaded, spilled, error). */
  offDevice(): IKernelRecord[] {
    return this.kernels.filter(k => k.device === null || k.device === undefined);
  }

  /** Recent offloads, restores and migrations of the kernels whose history is known, newest first. */
  activity(limit = 10): IActivity[] {
    const all: IActivity[] = [];
    for (const detail of this._details.values()) {
      const current = this.kernel(detail.kernel_id) ?? detail;
      all.push(...kernelActivity({ ...detail, ...current }, detail.events));
    }
    all.sort((a, b) => b.time - a.time);
    return all.slice(0, limit);
  }

  /** The last measured rate (bytes/s) of this kind of transfer: the kernel's own, else any. */
  lastRate(kernelId: string, kind: 'offload' | 'restore'): number | null {
    const matches = (a: IActivity) =>
      (kind === 'offload' ? a.kind === 'offload' : a.kind !== 'offload') && !a.failed;
    const all = this.activity(100).filter(matches);
    const own = all.find(a => a.kernel_id === kernelId && transferRate(a.bytes, a.duration));
    const any = own ?? all.find(a => transferRate(a.bytes, a.duration));
    return any ? transferRate(any.bytes, any.duration) : null;
  }

  /** When (by this model's clock) the kernel was seen entering its current state, if seen. */
  enteredAt(kernelId: string): number | null {
    return this._enteredAt.get(kernelId) ?? null;
  }

  /** My quota as gauges. Unlimited memory is drawn against the pool's total memory. */
  gauges(): { memory: IGauge; hours: IGauge; kernels: IGauge } | null {
    if (!this._quota) {
      return null;
    }
    const { limits, usage } = this._quota;
    const poolBytes = this.devices.reduce((sum, d) => sum + d.total_bytes, 0);
    return {
      memory: gauge(usage.gpu_bytes, limits.gpu_memory, poolBytes),
      hours: gauge(usage.gpu_seconds_today, limits.gpu_seconds_per_day, 86400),
      kernels: gauge(
        usage.resident_kernels,
        limits.max_resident_kernels,
        Math.max(1, this.kernels.filter(k => this.isMine(k)).length)
      )
    };
  }

  /**
   * Fetch the pool, who I am, my quota and my kernels' histories. Calls while one runs are merged
   * into one more run after it.
   */
  refresh(): Promise<void> {
    return this._refresh();
  }

  /**
   * An event from the server's event stream. Returns whether it is one of the pool's; if so,
   * the model patches what it can at once and refreshes shortly after.
   */
  handleEvent(event: IServerEvent): boolean {
    if (this._disposed || !event?.schema_id?.startsWith(EVENTS_URI)) {
      return false;
    }
    if (event.schema_id === KERNEL_STATE_SCHEMA && this._pool) {
      const kernelId = String(event.kernel_id ?? '');
      const next = event.new as string | null;
      const device = (event.device as number | null | undefined) ?? null;
      const index = this._pool.kernels.findIndex(k => k.kernel_id === kernelId);
      if (next === null) {
        if (index >= 0) {
          this._pool.kernels.splice(index, 1);
        }
        this._details.delete(kernelId);
        this._enteredAt.delete(kernelId);
      } else if (index >= 0) {
        this._pool.kernels[index] = { ...this._pool.kernels[index], state: next, device };
        this._enteredAt.set(kernelId, this._clock());
      }
      this._changed.emit();
    }
    this._scheduleRefresh();
    return true;
  }

  offload(kernelId: string): Promise<boolean> {
    return this._act(kernelId, 'offload', () => this.api.offload(kernelId));
  }

  restore(kernelId: string): Promise<boolean> {
    return this._act(kernelId, 'restore', () => this.api.restore(kernelId));
  }

  pin(kernelId: string, pinned: boolean): Promise<boolean> {
    return this._act(kernelId, pinned ? 'pin' : 'unpin', () =>
      this.api.pin(kernelId, pinned)
    );
  }

  /** The quota configuration (for the admin editor). */
  loadQuotas(): Promise<IQuotas> {
    return this.api.quotas();
  }

  /** Replace the quotas (admin); throws with the server's message when refused. */
  async saveQuotas(quotas: Record<string, unknown>): Promise<IQuotas> {
    const result = await this.api.setQuotas(quotas);
    void this.refresh();
    return result;
  }

  dispose(): void {
    if (this._disposed) {
      return;
    }
    this._disposed = true;
    if (this._timer !== null) {
      clearTimeout(this._timer);
      this._timer = null;
    }
    Signal.clearData(this);
  }

  private async _fetch(): Promise<void> {
    const [pool, quota, me] = await Promise.allSettled([
      this.api.pool(),
      this.api.quota(),
      this.api.me()
    ]);
    if (this._disposed) {
      return;
    }
    if (pool.status === 'rejected') {
      this._error = `Cannot read the GPU pool: ${errorMessage(pool.reason)}`;
      this._changed.emit();
      return;
    }
    const before = new Map(this.kernels.map(k => [k.kernel_id, k.state]));
    const snapshot = pool.value;
    this._pool = snapshot;
    this._error = null;
    if (quota.status === 'fulfilled') {
      this._quota = quota.value;
    }
    if (me.status === 'fulfilled') {
      this._me = me.value;
    }
    const now = this._clock();
    for (const k of snapshot.kernels) {
      const previous = before.get(k.kernel_id);
      if (previous !== undefined && previous !== k.state) {
        this._enteredAt.set(k.kernel_id, now);
      }
    }
    const present = new Set(snapshot.kernels.map(k => k.kernel_id));
    for (const id of [...this._details.keys()]) {
      if (!present.has(id)) {
        this._details.delete(id);
      }
    }
    const mine = snapshot.kernels.filter(k => this.isMine(k)).slice(0, this._detailLimit);
    const details = await Promise.allSettled(mine.map(k => this.api.kernel(k.kernel_id)));
    if (this._disposed) {
      return;
    }
    details.forEach(result => {
      if (result.status === 'fulfilled' && result.value) {
        this._details.set(result.value.kernel_id, result.value);
      }
    });
    this._changed.emit();
  }

  private _scheduleRefresh(): void {
    if (this._timer !== null) {
      return;
    }
    this._timer = setTimeout(() => {
      this._timer = null;
      void this.refresh();
    }, this._debounce);
  }

  private async _act(
    kernelId: string,
    action: string,
    call: () => Promise<IKernelDetail>
  ): Promise<boolean> {
    this._pending.set(kernelId, action);
    this._actionError = null;
    this._changed.emit();
    try {
      const record = await call();
      if (record && this._pool) {
        const { events, ...rest } = record;
        const index = this._pool.kernels.findIndex(k => k.kernel_id === kernelId);
        if (index >= 0) {
          if (this._pool.kernels[index].state !== rest.state) {
            this._enteredAt.set(kernelId, this._clock());
          }
          this._pool.kernels[index] = rest;
        }
        if (events) {
          this._details.set(kernelId, record);
        }
      }
      return true;
    } catch (error) {
      const kernel = this.kernel(kernelId);
      const name = kernel ? this.displayName(kernel) : kernelId.slice(0, 8);
      this._actionError = {
        kernelId,
        action,
        message: `Could not ${action} ${name}: ${errorMessage(error)}`
      };
      return false;
    } finally {
      this._pending.delete(kernelId);
      this._changed.emit();
      if (!this._disposed) {
        void this.refresh();
      }
    }
  }

  private _pool: IPool | null = null;
  private _quota: IQuota | null = null;
  private _me: IMe | null = null;
  private _details = new Map<string, IKernelDetail>();
  private _pending = new Map<string, string>();
  private _enteredAt = new Map<string, number>();
  private _error: string | null = null;
  private _actionError: IActionError | null = null;
  private _refresh = coalesce(
    () => this._fetch(),
    () => this._disposed
  );
  private _timer: ReturnType<typeof setTimeout> | null = null;
  private _disposed = false;
  private _debounce: number;
  private _detailLimit: number;
  private _clock: () => number;
  private _notebookPath: (kernelId: string) => string | null | undefined;
  private _changed = new Signal<this, void>(this);
}

/** A gauge of `value` against `limit`, or against `scale` (not a limit) when unlimited. */
export function gauge(value: number, limit: number | null, scale: number): IGauge {
  const max = limit ?? scale;
  const fraction = max > 0 ? Math.min(1, Math.max(0, value / max)) : value > 0 ? 1 : 0;
  return { value, limit, fraction, full: limit !== null && value >= limit };
}

/** Whether a restore makes sense for a kernel in this state. */
export function canRestore(record: IKernelRecord): boolean {
  return OFF_DEVICE_STATES.has(record.state);
}

/** Whether an offload makes sense for a kernel in this state. */
export function canOffload(record: IKernelRecord): boolean {
  return record.state === 'resident' && record.device !== null;
}
