/**
 * The pictures' data shaping: the server's history answers turned into what the Vega-Lite charts
 * draw (lanes, bars, marks, tooltips, days against the limit, admins' totals).
 */

import {
  dayBars,
  dayLabel,
  dayName,
  gpuTimeSpec,
  IViewer,
  MAX_TOTALS,
  notebookLabel,
  timelineRows,
  timelineSpec,
  timeFormat,
  totalRows,
  totalsSpec,
  transferMarks
} from '../charts';
import { IGpuTime, IStateEvent, ITimeline, ITimelineLease } from '../types';
import { GiB } from './records';

const T = 1_700_000_000; // the window's end, epoch seconds
const ADA: IViewer = { me: 'ada', admin: false };
const ADMIN: IViewer = { me: 'root', admin: true };

function lease(
  kernel: string,
  user: string,
  start: number,
  end: number | null,
  overrides: Partial<ITimelineLease> = {}
): ITimelineLease {
  return {
    lease_id: `${kernel}:${start}`,
    kernel_id: kernel,
    user,
    device: 0,
    start,
    end,
    peak_bytes: GiB,
    reservation_bytes: 2 * GiB,
    ...overrides
  };
}

let nextId = 1;
function change(
  kernel: string,
  user: string,
  time: number,
  old: string | null,
  next: string,
  extra: Partial<IStateEvent> = {}
): IStateEvent {
  return {
    id: nextId++,
    time,
    kernel_id: kernel,
    user,
    old_state: old,
    new_state: next,
    reason: '',
    device_index: null,
    nbytes: null,
    duration: null,
    ...extra
  };
}

/**
 * Two notebooks of ada's took turns on GPU 0 while bob's ran on GPU 1: ada's first kernel was
 * offloaded for her second, then restored (her second offloaded) — the ledger's answer.
 */
function turns(): ITimeline {
  return {
    since: T - 6 * 3600,
    until: T,
    now: T,
    devices: [
      { index: 0, name: 'Simulated GPU' },
      { index: 1, name: 'Simulated GPU' }
    ],
    leases: [
      lease('k-first', 'ada', T - 300, T - 290),
      lease('k-bob', 'bob', T - 280, T - 100, { device: 1, peak_bytes: null }),
      lease('k-second', 'ada', T - 250, T - 240),
      lease('k-first', 'ada', T - 200, T - 199.99),
      lease('k-second', 'ada', T - 50, null)
    ],
    changes: [
      change('k-first', 'ada', T - 252, 'resident', 'offloading', { device_index: 0 }),
      change('k-first', 'ada', T - 251, 'offloading', 'offloaded', {
        nbytes: GiB,
        duration: 0.5
      }),
      change('k-second', 'ada', T - 202, 'resident', 'offloading', { device_index: 0 }),
      change('k-second', 'ada', T - 201, 'offloading', 'offloaded', {
        nbytes: 2 * GiB,
        duration: 1
      }),
      change('k-first', 'ada', T - 201, 'offloaded', 'restoring', { device_index: 0 }),
      change('k-first', 'ada', T - 200, 'restoring', 'running', {
        device_index: 0,
        nbytes: GiB,
        duration: 0.25
      })
    ],
    kernels: {
      'k-first': { user: 'ada', notebook: '/home/ada/first.ipynb' },
      'k-second': { user: 'ada', notebook: '/home/ada/second.ipynb' },
      'k-bob': { user: 'bob', notebook: '' }
    },
    truncated: false
  };
}

describe('timelineRows', () => {
  it('draws a lane per device and a bar per lease, coloured by user', () => {
    const rows = timelineRows(turns(), ADA);
    expect(rows.lanes).toEqual(['GPU 0', 'GPU 1']);
    expect(rows.bars.map(b => [b.kernel, b.lane, b.user])).toEqual([
      ['k-first', 'GPU 0', 'ada'],
      ['k-bob', 'GPU 1', 'bob'],
      ['k-second', 'GPU 0', 'ada'],
      ['k-first', 'GPU 0', 'ada'],
      ['k-second', 'GPU 0', 'ada']
    ]);
    const first = rows.bars[0];
    expect([first.start, first.end]).toEqual([(T - 300) * 1000, (T - 290) * 1000]);
    expect(first.duration).toBe('10 s');
    expect(first.memory).toBe('1 GiB peak');
    expect(rows.bars[1].memory).toBe('2 GiB reserved'); // no peak reported: its reservation
  });

  it('shows my notebooks, and another user\u2019s only to an admin', () => {
    const mine = timelineRows(turns(), ADA);
    expect(mine.bars[0].notebook).toBe('first.ipynb');
    expect(mine.bars[1].notebook).toBe("another user's (kernel k-bob)");
    const answer = turns();
    answer.kernels['k-bob'].notebook = '/home/bob/secret.ipynb'; // what an admin gets
    const admin = timelineRows(answer, ADMIN);
    expect(admin.bars[1].notebook).toBe('secret.ipynb');
  });

  it('names my kernel by its session\u2019s path when the notebook was renamed', () => {
    const viewer = { ...ADA, notebookPath: (id: string) => (id === 'k-first' ? 'renamed.ipynb' : null) };
    const rows = timelineRows(turns(), viewer);
    expect(rows.bars[0].notebook).toBe('renamed.ipynb');
    expect(rows.bars[2].notebook).toBe('second.ipynb');
  });

  it('says when a kernel has left the pool', () => {
    const answer = turns();
    answer.kernels['k-first'].notebook = '';
    expect(timelineRows(answer, ADA).bars[0].notebook).toBe('kernel k-first (no longer in the pool)');
  });

  it('draws a running cell to now and a very short one still visible', () => {
    const rows = timelineRows(turns(), ADA);
    const running = rows.bars[4];
    expect(running.running).toBe(true);
    expect(running.end).toBe(T * 1000);
    expect(running.duration).toBe('50 s so far');
    const short = rows.bars[3];
    expect(short.duration).toBe('0.01 s');
    const span = rows.domain[1] - rows.domain[0];
    expect(short.end - short.start).toBeCloseTo(span / 250, 6);
  });

  it('zooms the axis onto what happened, and clips a lease that began before the window', () => {
    const rows = timelineRows(turns(), ADA);
    // From a little before the first lease (5% of the span, at least 10 s) to now.
    expect(rows.domain).toEqual([(T - 300 - 15) * 1000, T * 1000]);
    const answer = turns();
    answer.leases.unshift(lease('k-old', 'ada', T - 7 * 3600, T - 5 * 3600));
    const clipped = timelineRows(answer, ADA);
    expect(clipped.domain[0]).toBe(answer.since * 1000);
    expect(clipped.bars[0].start).toBe(answer.since * 1000);
    expect(clipped.bars[0].duration).toBe('2 h');
  });

  it('adds a lane for a device a lease was on that the pool no longer has', () => {
    const answer = turns();
    answer.leases.push(lease('k-gone', 'ada', T - 10, T - 5, { device: 3 }));
    expect(timelineRows(answer, ADA).lanes).toEqual(['GPU 0', 'GPU 1', 'GPU 3']);
  });

  it('has an empty window end at now', () => {
    const empty = { ...turns(), leases: [], changes: [], kernels: {}, now: T - 60 };
    const rows = timelineRows(empty, ADA);
    expect(rows.bars).toEqual([]);
    expect(rows.marks).toEqual([]);
    expect(rows.domain).toEqual([empty.since * 1000, (T - 60) * 1000]);
  });
});

describe('transferMarks', () => {
  it('marks offloads on the device left and restores on the device reached', () => {
    const marks = transferMarks(turns(), ADA);
    expect(marks.map(m => [m.kind, m.kernel, m.lane, m.time / 1000])).toEqual([
      ['offload', 'k-first', 'GPU 0', T - 251],
      ['restore', 'k-first', 'GPU 0', T - 200],
      ['offload', 'k-second', 'GPU 0', T - 201]
    ].sort((a, b) => (a[3] as number) - (b[3] as number)));
    const offload = marks.find(m => m.kind === 'offload' && m.kernel === 'k-first')!;
    expect(offload).toMatchObject({
      notebook: 'first.ipynb',
      user: 'ada',
      bytes: '1 GiB',
      duration: '0.50 s',
      rate: '2.1 GB/s',
      failed: false
    });
  });

  it('marks a restore onto another device as a migration', () => {
    const answer = turns();
    answer.changes[4] = { ...answer.changes[4], device_index: 1 };
    answer.changes[5] = { ...answer.changes[5], device_index: 1 };
    const migration = transferMarks(answer, ADA).find(m => m.kernel === 'k-first' && m.kind !== 'offload')!;
    expect(migration.kind).toBe('migration');
    expect(migration.lane).toBe('GPU 1');
  });

  it('leaves out a transfer whose start lies before the window', () => {
    const answer = turns();
    answer.changes = answer.changes.slice(1); // k-first's "→ offloading" is not in the window
    const kinds = transferMarks(answer, ADA).map(m => `${m.kind} ${m.kernel}`);
    expect(kinds).not.toContain('offload k-first');
    expect(kinds).toContain('restore k-first');
  });

  it('hides another user\u2019s notebook from a user who is no admin', () => {
    const answer = turns();
    answer.changes = [
      change('k-bob', 'bob', T - 150, 'resident', 'offloading', { device_index: 1 }),
      change('k-bob', 'bob', T - 149, 'offloading', 'offloaded', { nbytes: GiB, duration: 1 })
    ];
    const [mark] = transferMarks(answer, ADA);
    expect(mark.notebook).toBe("another user's (kernel k-bob)");
    expect(mark.lane).toBe('GPU 1');
  });
});

describe('timelineSpec', () => {
  it('layers lease bars coloured by user and transfer marks, with their tooltips', () => {
    const rows = timelineRows(turns(), ADA);
    const spec = timelineSpec(rows) as any;
    expect(spec.$schema).toContain('vega-lite/v5');
    expect(spec.encoding.y.scale.domain).toEqual(['GPU 0', 'GPU 1']);
    const [bars, marks] = spec.layer;
    expect(bars.data.values).toBe(rows.bars);
    expect(bars.mark.type).toBe('bar');
    expect(bars.encoding.color.field).toBe('user');
    expect(bars.encoding.x.scale.domain).toEqual(rows.domain);
    expect(bars.encoding.x2.field).toBe('end');
    expect(bars.encoding.x.axis.format).toBe('%H:%M:%S'); // five minutes: seconds matter
    expect(timeFormat([0, 3600_000])).toBe('%H:%M');
    const titles = (layer: any) => layer.encoding.tooltip.map((t: any) => t.title);
    expect(titles(bars)).toEqual(expect.arrayContaining(['notebook', 'user', 'duration', 'bytes']));
    // Every tooltip field is a field of the rows.
    for (const t of bars.encoding.tooltip) {
      expect(Object.keys(rows.bars[0])).toContain(t.field);
    }
    expect(marks.data.values).toBe(rows.marks);
    expect(marks.encoding.shape.field).toBe('kind');
    // Shapes for the kinds drawn only: here offloads and restores, no migration.
    expect(marks.encoding.shape.scale).toEqual({
      domain: ['offload', 'restore'],
      range: ['triangle-down', 'triangle-up']
    });
    expect(titles(marks)).toEqual(expect.arrayContaining(['notebook', 'user', 'duration', 'bytes']));
    for (const t of marks.encoding.tooltip) {
      expect(Object.keys(rows.marks[0])).toContain(t.field);
    }
    // Zooming the time axis by dragging or scrolling on the bars.
    expect(bars.params[0]).toMatchObject({ bind: 'scales', select: { encodings: ['x'] } });
    expect(JSON.parse(JSON.stringify(spec))).toEqual(spec); // plain JSON, as the renderer takes it
  });
});

function gpuTime(limit: number | null, seconds: number[]): IGpuTime {
  const today = 1_700_006_400; // a UTC midnight (a Wednesday)
  return {
    user: 'ada',
    now: today + 3600,
    gpu_seconds_per_day: limit,
    days: seconds.map((s, n) => ({ day: today - (seconds.length - 1 - n) * 86400, gpu_seconds: s }))
  };
}

describe('My GPU time', () => {
  it('labels the days by their UTC date, today last', () => {
    const today = 1_700_006_400;
    expect(dayLabel(today, today)).toBe('today');
    expect(dayLabel(today - 86400, today)).toBe('Tue');
    expect(dayName(today - 86400)).toBe('Tue 14 Nov');
  });

  it('has a bar per day in hours, those over the daily limit marked', () => {
    const bars = dayBars(gpuTime(2 * 3600, [0, 3600, 9000, 0, 0, 0, 1800]));
    expect(bars.map(b => b.label)).toEqual(['Thu', 'Fri', 'Sat', 'Sun', 'Mon', 'Tue', 'today']);
    expect(bars[0].date).toBe('Thu 9 Nov');
    expect(bars.map(b => b.hours)).toEqual([0, 1, 2.5, 0, 0, 0, 0.5]);
    expect(bars.map(b => b.over)).toEqual([false, false, true, false, false, false, false]);
    expect(bars[2].used).toBe('2.50 h');
  });

  it('draws the limit as a rule, and none without a limit', () => {
    const limited = gpuTimeSpec(gpuTime(2 * 3600, [0, 3600])) as any;
    expect(limited.layer).toHaveLength(3);
    expect(limited.layer[1].mark.type).toBe('rule');
    expect(limited.layer[1].encoding.y.datum).toBe(2);
    expect(limited.layer[1].data).toEqual({ values: [{}] }); // one rule, drawn without bar data
    expect(limited.layer[2].encoding.text.value).toBe('limit 2.00 h');
    const unlimited = gpuTimeSpec(gpuTime(null, [0, 3600])) as any;
    expect(unlimited.layer).toHaveLength(1);
    expect(unlimited.layer[0].encoding.y.field).toBe('hours');
  });
});

describe('GPU time by user and group (admins)', () => {
  it('has today and the days for each, the most GPU time first', () => {
    const { rows, names, more } = totalRows(
      [
        { name: 'ada', gpu_seconds_today: 3600, gpu_seconds: 7200 },
        { name: 'bob', gpu_seconds_today: 0, gpu_seconds: 36000 }
      ],
      7
    );
    expect(names).toEqual(['bob', 'ada']);
    expect(more).toBe(0);
    expect(rows).toEqual([
      { name: 'bob', period: 'today', hours: 0, used: '0.00 h' },
      { name: 'bob', period: 'last 7 days', hours: 10, used: '10.00 h' },
      { name: 'ada', period: 'today', hours: 1, used: '1.00 h' },
      { name: 'ada', period: 'last 7 days', hours: 2, used: '2.00 h' }
    ]);
    const spec = totalsSpec(rows, names, 'user', 7) as any;
    expect(spec.data.values).toBe(rows);
    expect(spec.encoding.y.sort).toEqual(['bob', 'ada']);
    expect(spec.encoding.yOffset.field).toBe('period');
    expect(spec.encoding.tooltip[0].title).toBe('user');
  });

  it('shows at most MAX_TOTALS and counts the rest', () => {
    const many = Array.from({ length: MAX_TOTALS + 5 }, (_, n) => ({
      name: `u${String(n).padStart(2, '0')}`,
      gpu_seconds_today: 0,
      gpu_seconds: n
    }));
    const { names, more } = totalRows(many, 7);
    expect(names).toHaveLength(MAX_TOTALS);
    expect(names[0]).toBe(`u${MAX_TOTALS + 4}`);
    expect(more).toBe(5);
  });
});

describe('notebookLabel', () => {
  it('is the file name of the path', () => {
    expect(notebookLabel('k1', 'ada', 'work/a/b.ipynb', ADA)).toBe('b.ipynb');
  });
});
