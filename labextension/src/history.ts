/**
 * The history the panel's pictures show: the timeline of the last hours and the GPU time per day,
 * fetched through an {@link IHistoryAPI}. A plain class, like the pool model, so the tests drive it.
 */

import { IDisposable } from '@lumino/disposable';
import { ISignal, Signal } from '@lumino/signaling';

import type { IHistoryAPI } from './api';
import { errorMessage } from './format';
import { coalesce } from './refresh';
import type { IGpuTime, ITimeline } from './types';

/** The windows the timeline offers, in hours. */
export const TIMELINE_HOURS = [1, 6, 24] as const;
/** "This week": the last 7 UTC days, today included. */
export const WEEK_DAYS = 7;

export namespace HistoryModel {
  export interface IOptions {
    /** The timeline's window in hours (default 6). */
    hours?: number;
    /** Milliseconds to wait after {@link HistoryModel.refreshSoon} (default 1000). */
    debounce?: number;
    /** Seconds since the epoch (default: Date.now() / 1000). */
    clock?: () => number;
  }
}

export class HistoryModel implements IDisposable {
  constructor(
    readonly api: IHistoryAPI,
    options: HistoryModel.IOptions = {}
  ) {
    this._hours = options.hours ?? 6;
    this._debounce = options.debounce ?? 1000;
    this._clock = options.clock ?? (() => Date.now() / 1000);
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get isDisposed(): boolean {
    return this._disposed;
  }

  /** The last timeline answer, or null before the first. */
  get timeline(): ITimeline | null {
    return this._timeline;
  }

  /** The last GPU-time answer, or null before the first. */
  get gpuTime(): IGpuTime | null {
    return this._gpuTime;
  }

  /** Why the last refresh failed, or null. */
  get error(): string | null {
    return this._error;
  }

  /** The timeline's window in hours; setting it fetches the new window. */
  get hours(): number {
    return this._hours;
  }

  set hours(hours: number) {
    if (hours !== this._hours) {
      this._hours = hours;
      void this.refresh();
    }
  }

  /** Refresh after a short pause, merging a burst of calls (each pool event asks for one). */
  refreshSoon(): void {
    if (this._timer !== null || this._disposed) {
      return;
    }
    this._timer = setTimeout(() => {
      this._timer = null;
      void this.refresh();
    }, this._debounce);
  }

  /** Fetch the timeline and the GPU time; a call while one runs adds one more run after it. */
  refresh(): Promise<void> {
    return this._refresh();
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
    const until = Math.floor(this._clock());
    const [timeline, gpuTime] = await Promise.allSettled([
      this.api.timeline(until - this._hours * 3600, until),
      this.api.gpuTime(WEEK_DAYS)
    ]);
    if (this._disposed) {
      return;
    }
    const failed = [timeline, gpuTime].find(r => r.status === 'rejected');
    this._error = failed
      ? `Cannot read the GPU history: ${errorMessage((failed as PromiseRejectedResult).reason)}`
      : null;
    if (timeline.status === 'fulfilled') {
      this._timeline = timeline.value;
    }
    if (gpuTime.status === 'fulfilled') {
      this._gpuTime = gpuTime.value;
    }
    this._changed.emit();
  }

  private _timeline: ITimeline | null = null;
  private _gpuTime: IGpuTime | null = null;
  private _error: string | null = null;
  private _hours: number;
  private _debounce: number;
  private _clock: () => number;
  private _timer: ReturnType<typeof setTimeout> | null = null;
  private _refresh = coalesce(
    () => this._fetch(),
    () => this._disposed
  );
  private _disposed = false;
  private _changed = new Signal<this, void>(this);
}
