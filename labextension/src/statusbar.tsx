/**
 * The status bar item: where the active notebook's kernel stands in the GPU pool.
 */

import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ReactWidget } from '@jupyterlab/ui-components';
import React from 'react';

import { estimateProgress, kernelBytes, kernelStatus } from './format';
import { gpuIcon } from './icons';
import { PoolModel } from './model';

/** A progress bar: determinate when `fraction` is a number, else indeterminate. */
export function Progress(props: {
  fraction: number | null;
  label: string;
  className?: string;
}): JSX.Element {
  const determinate = props.fraction !== null;
  const percent = determinate ? Math.round((props.fraction as number) * 100) : undefined;
  return (
    <span
      className={`jp-singularity-progress ${
        determinate ? '' : 'jp-mod-indeterminate'
      } ${props.className ?? ''}`}
      role="progressbar"
      aria-label={props.label}
      aria-valuemin={0}
      aria-valuemax={100}
      aria-valuenow={percent}
      aria-valuetext={determinate ? `about ${percent}%` : 'in progress'}
    >
      <span
        className="jp-singularity-progress-fill"
        style={determinate ? { width: `${percent}%` } : undefined}
      />
    </span>
  );
}

export class PoolStatusItem extends ReactWidget {
  constructor(
    private readonly _model: PoolModel,
    private readonly _tracker: INotebookTracker,
    private readonly _open: () => void
  ) {
    super();
    this.addClass('jp-singularity-status-item');
    _model.changed.connect(this._onChange, this);
    _tracker.currentChanged.connect(this._onCurrentChanged, this);
    this._onCurrentChanged();
  }

  /** The kernel id of the active notebook, or null. */
  get kernelId(): string | null {
    return this._tracker.currentWidget?.sessionContext.session?.kernel?.id ?? null;
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._stopTicking();
    this._model.changed.disconnect(this._onChange, this);
    this._tracker.currentChanged.disconnect(this._onCurrentChanged, this);
    this._watch(null);
    super.dispose();
  }

  protected render(): JSX.Element | null {
    const panel = this._tracker.currentWidget;
    const kernelId = this.kernelId;
    if (!panel || !kernelId) {
      this._stopTicking();
      return null;
    }
    if (!this._model.loaded) {
      const text = this._model.error ? 'GPU pool: unavailable' : 'GPU pool…';
      return (
        <div
          className="jp-singularity-status"
          data-state="unknown"
          title={this._model.error ?? 'Reading the GPU pool'}
        >
          <gpuIcon.react tag="span" className="jp-singularity-status-icon" />
          <span className="jp-singularity-status-text">{text}</span>
        </div>
      );
    }
    const record = this._model.kernel(kernelId);
    const status = kernelStatus(record, this._model.queuePosition(kernelId));
    let progress: number | null = null;
    if (record && status.busy) {
      this._startTicking();
      const entered = this._model.enteredAt(kernelId);
      const rate = this._model.lastRate(
        kernelId,
        record.state === 'offloading' ? 'offload' : 'restore'
      );
      const bytes =
        record.state === 'restoring'
          ? record.host_bytes + record.disk_bytes || record.peak_bytes || 0
          : kernelBytes(record);
      progress =
        entered === null ? null : estimateProgress(bytes, this._model.now() - entered, rate);
    } else {
      this._stopTicking();
    }
    const onKey = (event: React.KeyboardEvent) => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        this._open();
      }
    };
    return (
      <div
        className="jp-singularity-status"
        data-state={status.state}
        data-kernel-id={kernelId}
        role="button"
        tabIndex={0}
        aria-label={`${status.label}. Open the GPU pool panel.`}
        title={status.label}
        onClick={() => this._open()}
        onKeyDown={onKey}
      >
        <gpuIcon.react tag="span" className="jp-singularity-status-icon" />
        <span className="jp-singularity-status-text">{status.text}</span>
        {status.busy && (
          <Progress fraction={progress} label={`${status.state} progress`} />
        )}
      </div>
    );
  }

  private _onChange(): void {
    this.update();
  }

  private _onCurrentChanged(): void {
    this._watch(this._tracker.currentWidget);
    this.update();
  }

  /** Follow the notebook's kernel: a restart or a kernel change gives a new kernel id. */
  private _watch(panel: NotebookPanel | null): void {
    if (this._watched) {
      this._watched.sessionContext.kernelChanged.disconnect(this._onChange, this);
      this._watched.sessionContext.sessionChanged.disconnect(this._onChange, this);
      this._watched.disposed.disconnect(this._onCurrentChanged, this);
    }
    this._watched = panel;
    if (panel) {
      panel.sessionContext.kernelChanged.connect(this._onChange, this);
      panel.sessionContext.sessionChanged.connect(this._onChange, this);
      panel.disposed.connect(this._onCurrentChanged, this);
    }
  }

  /** While data moves, redraw twice a second so the progress estimate advances (no requests). */
  private _startTicking(): void {
    if (this._ticker === null) {
      this._ticker = setInterval(() => this.update(), 500);
    }
  }

  private _stopTicking(): void {
    if (this._ticker !== null) {
      clearInterval(this._ticker);
      this._ticker = null;
    }
  }

  private _watched: NotebookPanel | null = null;
  private _ticker: ReturnType<typeof setInterval> | null = null;
}
