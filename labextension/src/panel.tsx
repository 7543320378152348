/**
 * The "GPU pool" sidebar panel: devices with a stacked memory bar per kernel, kernels off the
 * devices, the queue, my quota, recent transfers, and (for admins) the quota configuration.
 *
 * Everyone sees every kernel in the pool; the buttons on a kernel show only where the server
 * would accept them (my own kernels, or anyone's for an admin), and so does the quota editor.
 */

import type { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { ReactWidget } from '@jupyterlab/ui-components';
import React, { useEffect, useState } from 'react';

import {
  errorMessage,
  formatAgo,
  formatBytes,
  formatDuration,
  formatHours,
  formatRate,
  kernelBytes,
  stateLabel,
  TRANSITIONAL_STATES
} from './format';
import { HistoryCharts } from './charts-view';
import type { HistoryModel } from './history';
import { gpuIcon } from './icons';
import { canOffload, canRestore, IGauge, PoolModel } from './model';
import { Progress } from './statusbar';
import type { IActivity, IDevice, IKernelRecord, IQuotas } from './types';

export const PANEL_ID = 'jp-singularity-pool';

export namespace PoolPanel {
  export interface IOptions {
    model: PoolModel;
    /** The active notebook's kernel id, to mark it in the panel. */
    activeKernelId?: () => string | null;
    /** The ledger's history for the pictures (timeline, GPU time); none without it. */
    history?: HistoryModel;
    /** What draws the pictures: JupyterLab's renderers (Vega-Lite among them). */
    rendermime?: IRenderMimeRegistry | null;
  }
}

export class PoolPanel extends ReactWidget {
  constructor(options: PoolPanel.IOptions) {
    super();
    this._model = options.model;
    this._activeKernelId = options.activeKernelId ?? (() => null);
    this._history = options.history ?? null;
    this._rendermime = options.rendermime ?? null;
    this.id = PANEL_ID;
    this.title.icon = gpuIcon;
    this.title.caption = 'GPU pool';
    this.addClass('jp-singularity-panel');
    this.node.setAttribute('role', 'region');
    this.node.setAttribute('aria-label', 'GPU pool');
    this._model.changed.connect(this._onChange, this);
    this._history?.changed.connect(this._onChange, this);
  }

  get model(): PoolModel {
    return this._model;
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._model.changed.disconnect(this._onChange, this);
    this._history?.changed.disconnect(this._onChange, this);
    super.dispose();
  }

  /** Called by the plugin when the active notebook or its kernel changes. */
  refreshActive(): void {
    this.update();
  }

  protected onAfterShow(): void {
    void this._model.refresh();
    void this._history?.refresh();
    this.update();
  }

  protected render(): JSX.Element {
    return (
      <PoolView
        model={this._model}
        activeKernelId={this._activeKernelId()}
        history={this._history}
        rendermime={this._rendermime}
      />
    );
  }

  private _onChange(sender: unknown): void {
    if (!this.isVisible) {
      return;
    }
    // The pool changed (a lease, a transfer): the history has news too.
    if (sender === this._model) {
      this._history?.refreshSoon();
    }
    this.update();
  }

  private _model: PoolModel;
  private _activeKernelId: () => string | null;
  private _history: HistoryModel | null;
  private _rendermime: IRenderMimeRegistry | null;
}

function PoolView(props: {
  model: PoolModel;
  activeKernelId: string | null;
  history: HistoryModel | null;
  rendermime: IRenderMimeRegistry | null;
}): JSX.Element {
  const { model, activeKernelId, history } = props;
  const pool = model.pool;
  const inventory = pool?.inventory;
  return (
    <div className="jp-singularity-view">
      <header className="jp-singularity-header">
        <h2>GPU pool</h2>
        <button
          className="jp-singularity-button jp-mod-minimal"
          onClick={() => void model.refresh()}
          aria-label="Refresh the GPU pool"
          title="Refresh"
        >
          ⟳
        </button>
      </header>
      {(inventory?.simulated || model.isAdmin) && (
        <div className="jp-singularity-badges">
          {inventory?.simulated && (
            <span className="jp-singularity-badge" title="No NVIDIA GPU: these devices are simulated">
              simulated
            </span>
          )}
          {model.isAdmin && (
            <span
              className="jp-singularity-badge jp-singularity-admin-badge"
              title="You are an admin of the GPU pool: you may act on every user's kernel and edit the quotas"
            >
              admin
            </span>
          )}
        </div>
      )}
      {model.error && (
        <div className="jp-singularity-error" role="alert">
          {model.error}
        </div>
      )}
      {model.actionError && (
        <div className="jp-singularity-error" role="alert" data-kernel-id={model.actionError.kernelId}>
          <span className="jp-singularity-error-text">{model.actionError.message}</span>
          <button
            className="jp-singularity-button jp-mod-minimal"
            aria-label="Dismiss the error"
            onClick={() => model.clearActionError()}
          >
            ×
          </button>
        </div>
      )}
      {!pool && !model.error && <p className="jp-singularity-empty">Reading the GPU pool…</p>}
      {pool && (
        <>
          <Section title="Devices" className="jp-singularity-devices">
            {pool.devices.length === 0 && (
              <p className="jp-singularity-empty">
                No devices{inventory?.reason ? `: ${inventory.reason}` : ''}
              </p>
            )}
            {pool.devices.map(device => (
              <DeviceCard
                key={device.index}
                device={device}
                model={model}
                activeKernelId={activeKernelId}
              />
            ))}
          </Section>
          <OffDevice model={model} activeKernelId={activeKernelId} />
          <Queue model={model} />
          <Quota model={model} />
          {history && (
            <HistoryCharts
              history={history}
              rendermime={props.rendermime}
              viewer={{
                me: model.user,
                admin: model.isAdmin,
                notebookPath: kernelId => model.notebook({ kernel_id: kernelId, notebook: '' })
              }}
            />
          )}
          <Activity model={model} />
          {model.isAdmin && <QuotaEditor model={model} />}
        </>
      )}
    </div>
  );
}

function Section(props: {
  title: string;
  className?: string;
  children?: React.ReactNode;
}): JSX.Element {
  const id = `jp-singularity-h-${props.title.toLowerCase().replace(/[^a-z]+/g, '-')}`;
  return (
    <section className={`jp-singularity-section ${props.className ?? ''}`} aria-labelledby={id}>
      <h3 id={id}>{props.title}</h3>
      {props.children}
    </section>
  );
}

function DeviceCard(props: {
  device: IDevice;
  model: PoolModel;
  activeKernelId: string | null;
}): JSX.Element {
  const { device, model } = props;
  const segments = model.segments(device);
  const booked = device.booked_bytes;
  const label = `GPU ${device.index}, ${device.name}: ${formatBytes(booked)} of ${formatBytes(
    device.total_bytes
  )} booked`;
  return (
    <div className="jp-singularity-device" data-device={device.index}>
      <div className="jp-singularity-device-title">
        <span className="jp-singularity-device-name">
          GPU {device.index} · {device.name}
        </span>
        <span className="jp-singularity-device-usage">
          {formatBytes(booked)} / {formatBytes(device.total_bytes)}
        </span>
      </div>
      <div className="jp-singularity-bar" role="img" aria-label={label}>
        {segments.map(s => (
          <span
            key={s.kernel.kernel_id}
            className={`jp-singularity-segment jp-singularity-slot-${model.colourSlot(s.kernel.kernel_id)}`}
            data-kernel-id={s.kernel.kernel_id}
            data-state={s.kernel.state}
            style={{ width: `${(s.fraction * 100).toFixed(2)}%` }}
            title={`${model.displayName(s.kernel)} (${s.kernel.user}): ${stateLabel(
              s.kernel.state
            )}, ${formatBytes(s.bytes)}`}
          />
        ))}
      </div>
      {segments.length === 0 ? (
        <p className="jp-singularity-empty">No kernel holds memory here.</p>
      ) : (
        <ul className="jp-singularity-kernels">
          {segments.map(s => (
            <KernelRow
              key={s.kernel.kernel_id}
              kernel={s.kernel}
              model={model}
              active={s.kernel.kernel_id === props.activeKernelId}
              bytes={s.bytes}
            />
          ))}
        </ul>
      )}
    </div>
  );
}

function OffDevice(props: { model: PoolModel; activeKernelId: string | null }): JSX.Element | null {
  const kernels = props.model.offDevice();
  if (!kernels.length) {
    return null;
  }
  return (
    <Section title="Off the GPUs" className="jp-singularity-offdevice">
      <ul className="jp-singularity-kernels">
        {kernels.map(k => (
          <KernelRow
            key={k.kernel_id}
            kernel={k}
            model={props.model}
            active={k.kernel_id === props.activeKernelId}
            bytes={kernelBytes(k)}
          />
        ))}
      </ul>
    </Section>
  );
}

function KernelRow(props: {
  kernel: IKernelRecord;
  model: PoolModel;
  active: boolean;
  bytes: number;
}): JSX.Element {
  const { kernel, model } = props;
  const name = model.displayName(kernel);
  const pending = model.pending(kernel.kernel_id);
  // Marked as mine only once the server has said who I am.
  const mine = model.user !== null && model.isMine(kernel);
  const canAct = model.canAct(kernel);
  const busy = TRANSITIONAL_STATES.has(kernel.state);
  const where = OFFLOADED_WHERE[kernel.state];
  const position = model.queuePosition(kernel.kernel_id);
  return (
    <li
      className={`jp-singularity-kernel ${props.active ? 'jp-mod-active' : ''} ${
        mine ? 'jp-mod-mine' : ''
      }`}
      data-kernel-id={kernel.kernel_id}
      data-state={kernel.state}
      data-mine={mine ? 'true' : 'false'}
      aria-label={`${name}, ${kernel.user}${mine ? ' (you)' : ''}, ${stateLabel(kernel.state)}`}
    >
      <span
        className={`jp-singularity-swatch jp-singularity-slot-${model.colourSlot(kernel.kernel_id)}`}
        aria-hidden="true"
      />
      <div className="jp-singularity-kernel-main">
        <div className="jp-singularity-kernel-name" title={model.notebook(kernel) || kernel.kernel_id}>
          <span className="jp-singularity-kernel-title">{name}</span>
          {props.active && <span className="jp-singularity-tag">this notebook</span>}
          {kernel.pinned && <span className="jp-singularity-tag">pinned</span>}
        </div>
        <div className="jp-singularity-kernel-meta">
          <span className="jp-singularity-owner" title={mine ? 'Your kernel' : undefined}>
            {kernel.user}
            {mine && <span className="jp-singularity-you"> (you)</span>}
          </span>
          {' · '}
          <span className="jp-singularity-state" data-state={kernel.state}>
            {kernel.state === 'queued' && position ? `queued #${position}` : stateLabel(kernel.state)}
          </span>
          {props.bytes > 0 && ` · ${formatBytes(props.bytes)}${where ?? ''}`}
          {busy && <Progress fraction={null} label={`${kernel.state} ${name}`} />}
        </div>
        {kernel.offload_refused && (
          <div className="jp-singularity-note">offload refused: {kernel.offload_refused}</div>
        )}
        {canAct && (
          <div
            className="jp-singularity-actions"
            title={
              model.isMine(kernel)
                ? undefined
                : `${kernel.user}'s kernel: you act on it as an admin`
            }
          >
            {canRestore(kernel) ? (
              <button
                className="jp-singularity-button"
                disabled={pending !== null}
                onClick={() => void model.restore(kernel.kernel_id)}
                aria-label={`Restore ${name} onto a GPU`}
                title="Bring this kernel's state back onto a GPU now"
              >
                {pending === 'restore' ? 'Restoring…' : 'Restore'}
              </button>
            ) : (
              <button
                className="jp-singularity-button"
                disabled={pending !== null || !canOffload(kernel)}
                onClick={() => void model.offload(kernel.kernel_id)}
                aria-label={`Offload ${name} off the GPU`}
                title="Move this kernel's GPU state to host memory now"
              >
                {pending === 'offload' ? 'Offloading…' : 'Offload'}
              </button>
            )}
            <button
              className="jp-singularity-button"
              disabled={pending !== null}
              aria-pressed={kernel.pinned}
              onClick={() => void model.pin(kernel.kernel_id, !kernel.pinned)}
              aria-label={`${kernel.pinned ? 'Unpin' : 'Pin'} ${name}`}
              title={
                kernel.pinned
                  ? 'Let the pool offload this kernel when others need the GPU'
                  : 'Never offload this kernel to make room for others'
              }
            >
              {kernel.pinned ? 'Unpin' : 'Pin'}
            </button>
          </div>
        )}
      </div>
    </li>
  );
}

const OFFLOADED_WHERE: Record<string, string> = {
  offloaded: ' in host memory',
  spilled: ' on disk'
};

function Queue(props: { model: PoolModel }): JSX.Element {
  const queue = props.model.pool?.queue ?? [];
  return (
    <Section title="Queue" className="jp-singularity-queue">
      {queue.length === 0 ? (
        <p className="jp-singularity-empty">No cell is waiting for a GPU.</p>
      ) : (
        <ol className="jp-singularity-queue-list">
          {queue.map(entry => {
            const kernel = props.model.kernel(entry.kernel_id);
            return (
              <li key={entry.request_id} data-kernel-id={entry.kernel_id}>
                <strong>#{entry.position}</strong>{' '}
                {kernel ? props.model.displayName(kernel) : entry.kernel_id.slice(0, 8)}
                {kernel && ` (${kernel.user})`}
                {entry.memory ? ` · wants ${formatBytes(entry.memory)}` : ''}
                <div className="jp-singularity-kernel-meta">{entry.reason}</div>
              </li>
            );
          })}
        </ol>
      )}
    </Section>
  );
}

function Gauge(props: { label: string; gauge: IGauge; text: string; className: string }) {
  const { gauge } = props;
  const percent = Math.round(gauge.fraction * 100);
  return (
    <div className={`jp-singularity-gauge ${props.className}`}>
      <div className="jp-singularity-gauge-label">
        <span>{props.label}</span>
        <span>{props.text}</span>
      </div>
      <div
        className={`jp-singularity-gauge-bar ${gauge.full ? 'jp-mod-full' : ''} ${
          gauge.limit === null ? 'jp-mod-unlimited' : ''
        }`}
        role="meter"
        aria-label={`${props.label}: ${props.text}`}
        aria-valuemin={0}
        aria-valuemax={100}
        aria-valuenow={percent}
      >
        <span className="jp-singularity-gauge-fill" style={{ width: `${percent}%` }} />
      </div>
    </div>
  );
}

function Quota(props: { model: PoolModel }): JSX.Element | null {
  const quota = props.model.quota;
  const gauges = props.model.gauges();
  if (!quota || !gauges) {
    return null;
  }
  const { limits, usage } = quota;
  const of = (limit: string | null) => (limit === null ? ' (no limit)' : ` of ${limit}`);
  return (
    <Section title={`My quota (${quota.user})`} className="jp-singularity-quota">
      <Gauge
        className="jp-singularity-gauge-memory"
        label="Resident GPU memory"
        gauge={gauges.memory}
        text={`${formatBytes(usage.gpu_bytes)}${of(
          limits.gpu_memory === null ? null : formatBytes(limits.gpu_memory)
        )}`}
      />
      <Gauge
        className="jp-singularity-gauge-hours"
        label="GPU-hours today"
        gauge={gauges.hours}
        text={`${formatHours(usage.gpu_seconds_today)}${of(
          limits.gpu_seconds_per_day === null ? null : formatHours(limits.gpu_seconds_per_day)
        )}`}
      />
      <Gauge
        className="jp-singularity-gauge-kernels"
        label="Kernels on a GPU"
        gauge={gauges.kernels}
        text={`${usage.resident_kernels}${of(
          limits.max_resident_kernels === null ? null : String(limits.max_resident_kernels)
        )}`}
      />
      {limits.priority !== 1 && (
        <div className="jp-singularity-kernel-meta">priority weight {limits.priority}</div>
      )}
    </Section>
  );
}

const KIND_LABEL = { offload: 'offload', restore: 'restore', migration: 'migration' };

function route(a: IActivity): string {
  const gpu = (d: number | null) => (d === null ? 'GPU' : `GPU ${d}`);
  if (a.kind === 'offload') {
    return `${gpu(a.from)} → host`;
  }
  if (a.kind === 'migration') {
    return `${gpu(a.from)} → ${gpu(a.to)}`;
  }
  return `host → ${gpu(a.to)}`;
}

function Activity(props: { model: PoolModel }): JSX.Element {
  const activity = props.model.activity(10);
  const now = props.model.now();
  return (
    <Section title="Recent transfers" className="jp-singularity-activity">
      {activity.length === 0 ? (
        <p className="jp-singularity-empty">No offload or restore yet.</p>
      ) : (
        <ul className="jp-singularity-activity-list">
          {activity.map(a => {
            const measured = a.bytes
              ? `${formatBytes(a.bytes)} in ${formatDuration(a.duration)} · ${formatRate(
                  a.bytes,
                  a.duration
                )}`
              : `took ${formatDuration(a.duration)}`;
            return (
              <li
                key={`${a.kernel_id}-${a.time}-${a.kind}`}
                data-kind={a.kind}
                data-kernel-id={a.kernel_id}
                className={a.failed ? 'jp-mod-failed' : ''}
                title={a.reason}
              >
                <div className="jp-singularity-activity-head">
                  <span className="jp-singularity-tag" data-kind={a.kind}>
                    {KIND_LABEL[a.kind]}
                  </span>
                  <span className="jp-singularity-kernel-title">
                    {props.model.displayName(a)}
                  </span>
                  <span className="jp-singularity-ago">{formatAgo(a.time, now)}</span>
                </div>
                <div className="jp-singularity-kernel-meta">
                  {route(a)} · {measured}
                  {a.failed && ' · failed'}
                </div>
              </li>
            );
          })}
        </ul>
      )}
    </Section>
  );
}

/**
 * Admins (the panel shows it only to them): the quota configuration as JSON; the server checks
 * the permission and the content again.
 */
function QuotaEditor(props: { model: PoolModel }): JSX.Element {
  const [open, setOpen] = useState(false);
  const [config, setConfig] = useState<IQuotas | null>(null);
  const [text, setText] = useState('');
  const [message, setMessage] = useState<{ error: boolean; text: string } | null>(null);
  useEffect(() => {
    if (!open) {
      return;
    }
    props.model
      .loadQuotas()
      .then(q => {
        setConfig(q);
        setText(JSON.stringify(q.quotas, null, 2));
      })
      .catch(e => setMessage({ error: true, text: errorMessage(e) }));
  }, [open]);
  const save = async () => {
    let parsed: unknown;
    try {
      parsed = JSON.parse(text || '{}');
    } catch (e) {
      setMessage({ error: true, text: `Not valid JSON: ${errorMessage(e)}` });
      return;
    }
    try {
      const q = await props.model.saveQuotas(parsed as Record<string, unknown>);
      setConfig(q);
      setText(JSON.stringify(q.quotas, null, 2));
      setMessage({ error: false, text: 'Quotas saved.' });
    } catch (e) {
      setMessage({ error: true, text: `Could not save the quotas: ${errorMessage(e)}` });
    }
  };
  return (
    <details
      className="jp-singularity-section jp-singularity-quota-editor"
      onToggle={e => setOpen((e.target as HTMLDetailsElement).open)}
    >
      <summary>Quotas (admin)</summary>
      {config && (
        <p className="jp-singularity-kernel-meta">
          From {config.source}
          {config.error && <span className="jp-singularity-error-text"> · {config.error}</span>}
        </p>
      )}
      <label className="jp-singularity-kernel-meta" htmlFor="jp-singularity-quota-json">
        Keyed "default", "user:NAME" or "group:NAME"; e.g. {'{"default": {"gpu_memory": "8GiB", "gpu_hours_per_day": 4}}'}
      </label>
      <textarea
        id="jp-singularity-quota-json"
        className="jp-singularity-quota-json"
        value={text}
        spellCheck={false}
        rows={8}
        onChange={e => setText(e.target.value)}
      />
      <div className="jp-singularity-actions">
        <button className="jp-singularity-button" onClick={() => void save()}>
          Save quotas
        </button>
      </div>
      {message && (
        <div
          className={message.error ? 'jp-singularity-error' : 'jp-singularity-ok'}
          role={message.error ? 'alert' : 'status'}
        >
          {message.text}
        </div>
      )}
    </details>
  );
}
