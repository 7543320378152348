/**
 * The panel's pictures: the GPU timeline, "My GPU time" and (admins) GPU time per user and group.
 *
 * Drawn by JupyterLab's own Vega-Lite renderer (the `application/vnd.vegalite.v5+json` renderer of
 * @jupyterlab/vega5-extension, through the rendermime registry): the extension ships no charting
 * code of its own. The specifications come from charts.ts.
 */

import type { IRenderMime, IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { Widget } from '@lumino/widgets';
import React, { useEffect, useRef } from 'react';

import {
  gpuTimeSpec,
  IViewer,
  timelineRows,
  timelineSpec,
  totalRows,
  totalsSpec,
  VEGALITE_MIME,
  VegaLiteSpec
} from './charts';
import { formatHours } from './format';
import { HistoryModel, TIMELINE_HOURS, WEEK_DAYS } from './history';

/** How the renderer is asked to draw: SVG (crisp, and its marks are in the page), no menu. */
const EMBED_OPTIONS = { actions: false, renderer: 'svg' };

/** Whether the registry can draw Vega-Lite 5 (a lab with @jupyterlab/vega5-extension enabled). */
export function canDrawVegaLite(rendermime: IRenderMimeRegistry | null): boolean {
  return rendermime?.preferredMimeType({ [VEGALITE_MIME]: {} }, 'any') === VEGALITE_MIME;
}

/**
 * A Vega-Lite chart drawn by the registry's renderer, drawn again only when its specification
 * (or the theme, which the renderer reads when it draws) changes.
 */
export function VegaChart(props: {
  rendermime: IRenderMimeRegistry;
  spec: VegaLiteSpec;
  label: string;
  className: string;
  data?: Record<string, string | number>;
}): JSX.Element {
  const host = useRef<HTMLDivElement>(null);
  const renderer = useRef<IRenderMime.IRenderer | null>(null);
  const key = JSON.stringify(props.spec) + (document.body.dataset.jpThemeLight ?? '');
  useEffect(
    () => () => {
      renderer.current?.dispose();
      renderer.current = null;
    },
    []
  );
  useEffect(() => {
    const node = host.current;
    if (!node || !node.isConnected) {
      return;
    }
    if (!renderer.current) {
      renderer.current = props.rendermime.createRenderer(VEGALITE_MIME);
      Widget.attach(renderer.current, node);
    }
    // The renderer stores a PNG of what it drew through setData: nothing here keeps it.
    const model: IRenderMime.IMimeModel = {
      trusted: false,
      data: { [VEGALITE_MIME]: props.spec as IRenderMime.IMimeModel['data'][string] },
      metadata: { [VEGALITE_MIME]: { embed_options: EMBED_OPTIONS } },
      setData: () => undefined
    };
    void renderer.current.renderModel(model).catch(reason => {
      console.warn('jupyter-singularity: cannot draw a chart', reason);
    });
  }, [key]);
  const data = Object.fromEntries(
    Object.entries(props.data ?? {}).map(([name, value]) => [`data-${name}`, String(value)])
  );
  return (
    <div
      ref={host}
      className={`jp-singularity-chart ${props.className}`}
      role="img"
      aria-label={props.label}
      {...data}
    />
  );
}

/** The pictures' sections of the panel. */
export function HistoryCharts(props: {
  history: HistoryModel;
  rendermime: IRenderMimeRegistry | null;
  viewer: IViewer;
}): JSX.Element {
  const { history, rendermime, viewer } = props;
  if (!rendermime || !canDrawVegaLite(rendermime)) {
    return (
      <section className="jp-singularity-section jp-singularity-history">
        <h3>GPU timeline</h3>
        <p className="jp-singularity-empty">
          The pictures need JupyterLab&apos;s Vega-Lite renderer (@jupyterlab/vega5-extension),
          which is not enabled here.
        </p>
      </section>
    );
  }
  return (
    <>
      {history.error && (
        <div className="jp-singularity-error" role="alert">
          {history.error}
        </div>
      )}
      <Timeline history={history} rendermime={rendermime} viewer={viewer} />
      <MyGpuTime history={history} rendermime={rendermime} />
      {viewer.admin && <Totals history={history} rendermime={rendermime} />}
    </>
  );
}

function Timeline(props: {
  history: HistoryModel;
  rendermime: IRenderMimeRegistry;
  viewer: IViewer;
}): JSX.Element {
  const { history } = props;
  const answer = history.timeline;
  const rows = answer ? timelineRows(answer, props.viewer) : null;
  return (
    <section
      className="jp-singularity-section jp-singularity-timeline"
      aria-labelledby="jp-singularity-h-timeline"
    >
      <div className="jp-singularity-section-head">
        <h3 id="jp-singularity-h-timeline">GPU timeline</h3>
        <select
          className="jp-singularity-select"
          aria-label="Timeline window"
          value={history.hours}
          onChange={e => (history.hours = Number(e.target.value))}
        >
          {TIMELINE_HOURS.map(h => (
            <option key={h} value={h}>
              last {h} h
            </option>
          ))}
        </select>
      </div>
      {!rows && <p className="jp-singularity-empty">Reading the ledger…</p>}
      {rows && rows.bars.length === 0 && rows.marks.length === 0 && (
        <p className="jp-singularity-empty">No GPU lease in the last {history.hours} h.</p>
      )}
      {rows && (rows.bars.length > 0 || rows.marks.length > 0) && (
        <VegaChart
          rendermime={props.rendermime}
          spec={timelineSpec(rows)}
          className="jp-singularity-timeline-chart"
          label={`GPU timeline: ${rows.bars.length} leases on ${rows.lanes.length} devices, ${
            rows.marks.filter(m => m.kind === 'offload').length
          } offloads, ${rows.marks.filter(m => m.kind !== 'offload').length} restores`}
          data={{
            leases: rows.bars.length,
            kernels: new Set(rows.bars.map(b => b.kernel)).size,
            offloads: rows.marks.filter(m => m.kind === 'offload').length,
            restores: rows.marks.filter(m => m.kind !== 'offload').length
          }}
        />
      )}
      {answer?.truncated && (
        <p className="jp-singularity-kernel-meta">
          Only the latest records are shown: choose a shorter window for all of them.
        </p>
      )}
    </section>
  );
}

function MyGpuTime(props: { history: HistoryModel; rendermime: IRenderMimeRegistry }) {
  const answer = props.history.gpuTime;
  if (!answer) {
    return null;
  }
  const week = answer.days.reduce((sum, d) => sum + d.gpu_seconds, 0);
  const limit = answer.gpu_seconds_per_day;
  return (
    <section
      className="jp-singularity-section jp-singularity-my-gpu-time"
      aria-labelledby="jp-singularity-h-my-gpu-time"
    >
      <h3 id="jp-singularity-h-my-gpu-time">My GPU time</h3>
      <p className="jp-singularity-kernel-meta">
        {formatHours(week)} in the last {answer.days.length} days (UTC) ·{' '}
        {limit === null ? 'no daily limit' : `limit ${formatHours(limit)} a day`}
      </p>
      <VegaChart
        rendermime={props.rendermime}
        spec={gpuTimeSpec(answer)}
        className="jp-singularity-gpu-time-chart"
        label={`My GPU-hours per day: ${formatHours(week)} in the last ${answer.days.length} days`}
        data={{ days: answer.days.length }}
      />
    </section>
  );
}

function Totals(props: { history: HistoryModel; rendermime: IRenderMimeRegistry }) {
  const answer = props.history.gpuTime;
  if (!answer?.users) {
    return null;
  }
  const days = answer.days.length || WEEK_DAYS;
  const users = totalRows(
    answer.users.map(u => ({ ...u, name: u.user })),
    days
  );
  const groups = totalRows(
    (answer.groups ?? []).map(g => ({ ...g, name: g.group })),
    days
  );
  return (
    <section
      className="jp-singularity-section jp-singularity-totals"
      aria-labelledby="jp-singularity-h-totals"
    >
      <h3 id="jp-singularity-h-totals">GPU time by user and group (admin)</h3>
      {users.names.length === 0 ? (
        <p className="jp-singularity-empty">No GPU time in the last {days} days.</p>
      ) : (
        <VegaChart
          rendermime={props.rendermime}
          spec={totalsSpec(users.rows, users.names, 'user', days)}
          className="jp-singularity-users-chart"
          label={`GPU-hours per user, today and in the last ${days} days`}
          data={{ users: users.names.length }}
        />
      )}
      {users.more > 0 && (
        <p className="jp-singularity-kernel-meta">and {users.more} more users</p>
      )}
      {groups.names.length === 0 ? (
        <p className="jp-singularity-kernel-meta">
          Per group: the groups the quotas name ("group:NAME"; an entry may set no limit).
          None is named now.
        </p>
      ) : (
        <VegaChart
          rendermime={props.rendermime}
          spec={totalsSpec(groups.rows, groups.names, 'group', days)}
          className="jp-singularity-groups-chart"
          label={`GPU-hours per group, today and in the last ${days} days`}
          data={{ groups: groups.names.length }}
        />
      )}
    </section>
  );
}
