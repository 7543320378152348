/**
 * The pool's pictures as Vega-Lite specifications, shaped from the server's history answers
 * (`/singularity/api/timeline`, `/singularity/api/gpu-time`). Pure functions: JupyterLab's own
 * Vega-Lite renderer draws what they return (see charts-view.tsx), and the tests read them.
 *
 * Times in the data are epoch milliseconds (Vega's temporal values); durations, sizes and rates
 * are words already, as the rest of the panel writes them.
 */

import {
  formatBytes,
  formatDuration,
  formatHours,
  formatRate,
  kernelActivity,
  notebookName
} from './format';
import type { IActivity, IGpuTime, IKernelRecord, IStateEvent, ITimeline } from './types';

/** The MIME type of JupyterLab's Vega-Lite 5 renderer (@jupyterlab/vega5-extension). */
export const VEGALITE_MIME = 'application/vnd.vegalite.v5+json';
const SCHEMA = 'https://vega.github.io/schema/vega-lite/v5.json';

/** A Vega-Lite specification (plain JSON). */
export type VegaLiteSpec = Record<string, unknown>;

/**
 * The narrowest a lease bar is drawn, as a fraction of the time axis: a cell of a few
 * milliseconds stays visible (its tooltip says how long it really was).
 */
const MIN_BAR = 1 / 250;

/** Who looks, and what the frontend knows better than the server. */
export interface IViewer {
  /** The user whose kernels are mine (null while unknown). */
  me: string | null;
  admin: boolean;
  /** The current notebook path of one of my kernels, from its session (renames follow). */
  notebookPath?: (kernelId: string) => string | null | undefined;
}

/** One lease, as the timeline draws it. */
export interface ITimelineBar {
  lane: string;
  kernel: string;
  user: string;
  notebook: string;
  /** Epoch milliseconds. */
  start: number;
  /** Where the bar is drawn to (epoch ms): at least {@link MIN_BAR} of the axis after start. */
  end: number;
  duration: string;
  memory: string;
  /** Whether the cell still runs (its bar ends now). */
  running: boolean;
}

/** One offload, restore or migration, as the timeline marks it. */
export interface ITimelineMark {
  lane: string;
  kind: IActivity['kind'];
  kernel: string;
  user: string;
  notebook: string;
  /** When it finished, epoch milliseconds. */
  time: number;
  duration: string;
  bytes: string;
  rate: string;
  failed: boolean;
}

export interface ITimelineRows {
  /** "GPU 0", "GPU 1", ...: every device of the pool, and any other a lease was on. */
  lanes: string[];
  bars: ITimelineBar[];
  marks: ITimelineMark[];
  /** The time axis, epoch milliseconds: from the first record in the window (or its start) to now. */
  domain: [number, number];
}

export function laneName(device: number): string {
  return `GPU ${device}`;
}

/**
 * What the tooltip names a kernel by: its notebook's file name (my kernels: as the session names
 * it now); for a kernel whose notebook the server did not say, why.
 */
export function notebookLabel(
  kernelId: string,
  owner: string,
  notebook: string,
  viewer: IViewer
): string {
  const mine = viewer.me !== null && owner === viewer.me;
  const path = (mine && viewer.notebookPath?.(kernelId)) || notebook;
  if (path) {
    return notebookName(path);
  }
  if (!mine && !viewer.admin) {
    return `another user's (kernel ${kernelId.slice(0, 8)})`;
  }
  return `kernel ${kernelId.slice(0, 8)} (no longer in the pool)`;
}

/** The timeline's lanes, bars and marks from the server's answer. */
export function timelineRows(answer: ITimeline, viewer: IViewer): ITimelineRows {
  const now = Math.min(answer.now, answer.until);
  const devices = new Set(answer.devices.map(d => d.index));
  answer.leases.forEach(l => devices.add(l.device));
  const lanes = [...devices].sort((a, b) => a - b).map(laneName);
  const kernelOf = (id: string, user: string) => {
    const known = answer.kernels[id] ?? { user, notebook: '' };
    return {
      user: known.user,
      notebook: notebookLabel(id, known.user, known.notebook, viewer)
    };
  };

  // The axis: from the first thing that happened in the window (a little before it) to now.
  const times = [
    ...answer.leases.map(l => l.start),
    ...answer.changes.map(c => c.time)
  ].filter(t => t >= answer.since);
  const first = times.length ? Math.min(...times) : answer.since;
  const pad = Math.max(10, (now - first) * 0.05);
  const begin = answer.leases.some(l => l.start < answer.since)
    ? answer.since
    : Math.max(answer.since, first - pad);
  const domain: [number, number] = [begin * 1000, Math.max(now, begin + 1) * 1000];
  const minimum = (domain[1] - domain[0]) * MIN_BAR;

  const bars = answer.leases.map(lease => {
    const end = lease.end ?? now;
    const start = Math.max(lease.start, begin);
    const bytes = lease.peak_bytes ?? lease.reservation_bytes;
    return {
      lane: laneName(lease.device),
      kernel: lease.kernel_id,
      ...kernelOf(lease.kernel_id, lease.user),
      start: start * 1000,
      end: Math.max(end * 1000, start * 1000 + minimum),
      duration: formatDuration(end - lease.start) + (lease.end === null ? ' so far' : ''),
      memory:
        lease.peak_bytes !== null
          ? `${formatBytes(bytes)} peak`
          : `${formatBytes(bytes)} reserved`,
      running: lease.end === null
    };
  });
  return { lanes, bars, marks: transferMarks(answer, viewer), domain };
}

/** The offloads, restores and migrations in the answer, each on the lane of its device. */
export function transferMarks(answer: ITimeline, viewer: IViewer): ITimelineMark[] {
  const byKernel = new Map<string, IStateEvent[]>();
  for (const change of answer.changes) {
    const list = byKernel.get(change.kernel_id) ?? [];
    list.push(change);
    byKernel.set(change.kernel_id, list);
  }
  const marks: ITimelineMark[] = [];
  for (const [kernelId, events] of byKernel) {
    const owner = answer.kernels[kernelId]?.user ?? events[0].user;
    const notebook = notebookLabel(
      kernelId,
      owner,
      answer.kernels[kernelId]?.notebook ?? '',
      viewer
    );
    for (const a of kernelActivity(transferRecord(kernelId, owner), events)) {
      const device = a.kind === 'offload' ? a.from : a.to;
      if (device === null) {
        continue; // its start lies before the window: which device is unknown
      }
      marks.push({
        lane: laneName(device),
        kind: a.kind,
        kernel: kernelId,
        user: owner,
        notebook,
        time: a.time * 1000,
        duration: formatDuration(a.duration),
        bytes: formatBytes(a.bytes),
        rate: formatRate(a.bytes, a.duration),
        failed: a.failed
      });
    }
  }
  return marks.sort((a, b) => a.time - b.time);
}

/** A record that lends {@link kernelActivity} nothing: sizes come from the ledger alone. */
function transferRecord(kernelId: string, user: string): IKernelRecord {
  return {
    kernel_id: kernelId,
    user,
    notebook: '',
    state: '',
    device: null,
    gpu_bytes: 0,
    host_bytes: 0,
    disk_bytes: 0,
    pinned: false,
    last_activity: 0
  };
}

/** The shape of each kind of transfer's mark. */
export const MARK_SHAPES: Record<IActivity['kind'], string> = {
  offload: 'triangle-down',
  restore: 'triangle-up',
  migration: 'diamond'
};

/** Common looks: transparent background (the panel's shows through), small type. */
const CONFIG = {
  background: 'transparent',
  config: {
    view: { stroke: null },
    axis: { labelFontSize: 10, titleFontSize: 10 },
    legend: { labelFontSize: 10, titleFontSize: 10, symbolSize: 60 }
  }
};

/**
 * The timeline: one lane per device, a bar per lease coloured by user, ▼ offloads and ▲ restores
 * (◆ migrations) where they ended; drag or scroll on it to zoom the time axis.
 */
export function timelineSpec(rows: ITimelineRows): VegaLiteSpec {
  const kinds = (Object.keys(MARK_SHAPES) as IActivity['kind'][]).filter(kind =>
    rows.marks.some(m => m.kind === kind)
  );
  const started = { field: 'start', type: 'temporal', title: 'started', format: '%H:%M:%S' };
  return {
    $schema: SCHEMA,
    ...CONFIG,
    width: 'container',
    height: { step: 26 },
    autosize: { type: 'fit-x', contains: 'padding' },
    encoding: {
      y: {
        field: 'lane',
        type: 'nominal',
        title: null,
        scale: { domain: rows.lanes },
        sort: rows.lanes
      }
    },
    layer: [
      {
        data: { values: rows.bars },
        params: [
          {
            name: 'zoom',
            select: { type: 'interval', encodings: ['x'] },
            bind: 'scales'
          }
        ],
        mark: { type: 'bar', cornerRadius: 2, height: { band: 0.7 }, clip: true },
        encoding: {
          x: {
            field: 'start',
            type: 'temporal',
            title: null,
            scale: { domain: rows.domain },
            axis: {
              format: timeFormat(rows.domain),
              labelOverlap: true,
              labelFlush: true,
              tickCount: 3
            }
          },
          x2: { field: 'end' },
          color: {
            field: 'user',
            type: 'nominal',
            title: 'user',
            legend: { orient: 'bottom', direction: 'horizontal' }
          },
          tooltip: [
            { field: 'notebook', title: 'notebook' },
            { field: 'user', title: 'user' },
            { field: 'duration', title: 'duration' },
            { field: 'memory', title: 'bytes' },
            { field: 'lane', title: 'device' },
            started
          ]
        }
      },
      {
        data: { values: rows.marks },
        mark: {
          type: 'point',
          filled: true,
          size: 70,
          color: '#333',
          stroke: '#fff',
          strokeWidth: 1,
          opacity: 1,
          clip: true
        },
        encoding: {
          x: { field: 'time', type: 'temporal' },
          shape: {
            field: 'kind',
            type: 'nominal',
            title: null,
            // Only the kinds drawn, so the legend stays short in a narrow sidebar.
            scale: { domain: kinds, range: kinds.map(kind => MARK_SHAPES[kind]) },
            legend: { orient: 'bottom', direction: 'horizontal' }
          },
          tooltip: [
            { field: 'kind', title: 'transfer' },
            { field: 'notebook', title: 'notebook' },
            { field: 'user', title: 'user' },
            { field: 'duration', title: 'duration' },
            { field: 'bytes', title: 'bytes' },
            { field: 'rate', title: 'rate' },
            { field: 'time', type: 'temporal', title: 'ended', format: '%H:%M:%S' }
          ]
        }
      }
    ]
  };
}

/** The time axis' labels: with seconds when it spans 10 minutes or less, else hours and minutes. */
export function timeFormat(domain: [number, number]): string {
  return domain[1] - domain[0] <= 10 * 60 * 1000 ? '%H:%M:%S' : '%H:%M';
}

/** A UTC day (its midnight in epoch seconds) as a bar's label: "today", else "Mon". */
export function dayLabel(day: number, today: number): string {
  if (day === today) {
    return 'today';
  }
  return new Date(day * 1000).toLocaleDateString('en-GB', { weekday: 'short', timeZone: 'UTC' });
}

/** A UTC day in full, for the tooltip: "Mon 30 Nov". */
export function dayName(day: number): string {
  return new Date(day * 1000).toLocaleDateString('en-GB', {
    weekday: 'short',
    day: 'numeric',
    month: 'short',
    timeZone: 'UTC'
  });
}

export interface IDayBar {
  label: string;
  date: string;
  hours: number;
  /** "2.10 h", for the tooltip. */
  used: string;
  over: boolean;
}

/** My GPU-hours per day, today last, each marked when over my daily limit. */
export function dayBars(answer: IGpuTime): IDayBar[] {
  const today = answer.days.length ? answer.days[answer.days.length - 1].day : 0;
  const limit = answer.gpu_seconds_per_day;
  return answer.days.map(d => ({
    label: dayLabel(d.day, today),
    date: dayName(d.day),
    hours: d.gpu_seconds / 3600,
    used: formatHours(d.gpu_seconds),
    over: limit !== null && d.gpu_seconds > limit
  }));
}

/** "My GPU time": a bar per day against a rule at my daily limit (when I have one). */
export function gpuTimeSpec(answer: IGpuTime): VegaLiteSpec {
  const bars = dayBars(answer);
  const limit = answer.gpu_seconds_per_day;
  const layer: unknown[] = [
    {
      data: { values: bars },
      mark: { type: 'bar', cornerRadiusEnd: 2 },
      encoding: {
        x: {
          field: 'label',
          type: 'ordinal',
          title: null,
          sort: null,
          axis: { labelAngle: 0 }
        },
        y: { field: 'hours', type: 'quantitative', title: 'GPU-hours' },
        color: {
          condition: { test: 'datum.over', value: '#d62728' },
          value: '#4c78a8'
        },
        tooltip: [
          { field: 'date', title: 'day (UTC)' },
          { field: 'used', title: 'GPU time' }
        ]
      }
    }
  ];
  if (limit !== null) {
    const hours = limit / 3600;
    layer.push(
      {
        data: { values: [{}] },
        mark: { type: 'rule', color: '#d62728', strokeDash: [4, 3] },
        encoding: { y: { datum: hours } }
      },
      {
        data: { values: [{}] },
        mark: {
          type: 'text',
          align: 'right',
          dx: -2,
          dy: -6,
          x: 'width',
          color: '#d62728',
          fontSize: 10
        },
        encoding: { y: { datum: hours }, text: { value: `limit ${formatHours(limit)}` } }
      }
    );
  }
  return {
    $schema: SCHEMA,
    ...CONFIG,
    width: 'container',
    height: 110,
    autosize: { type: 'fit-x', contains: 'padding' },
    layer
  };
}

export interface ITotalRow {
  name: string;
  period: string;
  hours: number;
  used: string;
}

/** At most this many users (or groups) in an admin's chart: the most GPU time first. */
export const MAX_TOTALS = 20;

/**
 * Rows of an admin's chart: each user's (or group's) GPU-hours today and over the days asked
 * for, the {@link MAX_TOTALS} with the most GPU time; `more` counts those left out.
 */
export function totalRows(
  totals: { name: string; gpu_seconds_today: number; gpu_seconds: number }[],
  days: number
): { rows: ITotalRow[]; names: string[]; more: number } {
  const ranked = [...totals].sort(
    (a, b) => b.gpu_seconds - a.gpu_seconds || a.name.localeCompare(b.name)
  );
  const shown = ranked.slice(0, MAX_TOTALS);
  const period = `last ${days} days`;
  const rows: ITotalRow[] = [];
  for (const t of shown) {
    rows.push(
      { name: t.name, period: 'today', hours: t.gpu_seconds_today / 3600, used: formatHours(t.gpu_seconds_today) },
      { name: t.name, period, hours: t.gpu_seconds / 3600, used: formatHours(t.gpu_seconds) }
    );
  }
  return { rows, names: shown.map(t => t.name), more: ranked.length - shown.length };
}

/** An admin's chart of GPU-hours per user or per group: today beside the last days. */
export function totalsSpec(
  rows: ITotalRow[],
  names: string[],
  what: 'user' | 'group',
  days: number
): VegaLiteSpec {
  return {
    $schema: SCHEMA,
    ...CONFIG,
    width: 'container',
    height: { step: 11 },
    autosize: { type: 'fit-x', contains: 'padding' },
    data: { values: rows },
    mark: { type: 'bar', cornerRadiusEnd: 2 },
    encoding: {
      y: { field: 'name', type: 'nominal', title: null, sort: names },
      yOffset: { field: 'period', sort: ['today', `last ${days} days`] },
      x: { field: 'hours', type: 'quantitative', title: 'GPU-hours' },
      color: {
        field: 'period',
        type: 'nominal',
        title: null,
        sort: ['today', `last ${days} days`],
        legend: { orient: 'bottom', direction: 'horizontal' }
      },
      tooltip: [
        { field: 'name', title: what },
        { field: 'period', title: 'when' },
        { field: 'used', title: 'GPU time' }
      ]
    }
  };
}
