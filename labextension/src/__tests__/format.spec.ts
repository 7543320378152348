import {
  errorMessage,
  estimateProgress,
  formatAgo,
  formatBytes,
  formatDuration,
  formatHours,
  formatRate,
  kernelActivity,
  kernelName,
  kernelStatus,
  notebookName
} from '../format';
import type { IKernelRecord, IStateEvent } from '../types';

const GiB = 1024 ** 3;

function record(overrides: Partial<IKernelRecord> = {}): IKernelRecord {
  return {
    kernel_id: 'a3cbe111-406b-42e2-83cc-bb300a812c97',
    user: 'ada',
    notebook: '/home/ada/work/train.ipynb',
    state: 'resident',
    device: 1,
    home: 1,
    gpu_bytes: 12.1 * GiB,
    booked_bytes: 12.1 * GiB,
    host_bytes: 0,
    disk_bytes: 0,
    pinned: false,
    last_activity: 1000,
    peak_bytes: 12.1 * GiB,
    lease: null,
    offload_refused: null,
    ...overrides
  };
}

let nextId = 1;
function ev(
  time: number,
  old_state: string | null,
  new_state: string,
  device_index: number | null,
  extra: Partial<IStateEvent> = {}
): IStateEvent {
  return {
    id: nextId++,
    time,
    kernel_id: 'a3cbe111-406b-42e2-83cc-bb300a812c97',
    user: 'ada',
    old_state,
    new_state,
    reason: 'test',
    device_index,
    nbytes: null,
    duration: null,
    ...extra
  };
}

describe('formatBytes', () => {
  it.each([
    [0, '0 B'],
    [512, '512 B'],
    [1024, '1 KiB'],
    [1536, '1.5 KiB'],
    [2 * GiB, '2 GiB'],
    [12.1 * GiB, '12.1 GiB'],
    [16 * GiB, '16 GiB'],
    [150 * 1024 ** 2, '150 MiB'],
    [80 * GiB, '80 GiB'],
    [2 * 1024 ** 4, '2 TiB']
  ])('%d bytes is %s', (bytes, text) => {
    expect(formatBytes(bytes)).toBe(text);
  });

  it('says "—" for unknown sizes and never shows a negative one', () => {
    expect(formatBytes(null)).toBe('—');
    expect(formatBytes(undefined)).toBe('—');
    expect(formatBytes(NaN)).toBe('—');
    expect(formatBytes(-5)).toBe('0 B');
  });
});

describe('formatRate', () => {
  it('is decimal GB/s', () => {
    expect(formatRate(54.2e9, 1)).toBe('54.2 GB/s');
    expect(formatRate(8 * GiB, 0.158)).toBe('54.4 GB/s');
    expect(formatRate(12.9e9, 5.36)).toBe('2.4 GB/s');
    expect(formatRate(500e9, 1)).toBe('500 GB/s');
  });

  it('falls back to MB/s for slow transfers', () => {
    expect(formatRate(5e6, 1)).toBe('5.0 MB/s');
  });

  it('is "—" without bytes or a positive duration', () => {
    expect(formatRate(null, 1)).toBe('—');
    expect(formatRate(0, 1)).toBe('—');
    expect(formatRate(1e9, 0)).toBe('—');
    expect(formatRate(1e9, null)).toBe('—');
  });
});

describe('formatDuration / formatHours / formatAgo', () => {
  it.each([
    [0.41, '0.41 s'],
    [5.36, '5.4 s'],
    [42, '42 s'],
    [123, '2 min 3 s'],
    [120, '2 min'],
    [3720, '1 h 2 min'],
    [7200, '2 h']
  ])('%d s is %s', (s, text) => {
    expect(formatDuration(s)).toBe(text);
  });

  it('formats GPU-hours and unknowns', () => {
    expect(formatHours(7560)).toBe('2.10 h');
    expect(formatHours(null)).toBe('—');
    expect(formatDuration(null)).toBe('—');
  });

  it('says how long ago', () => {
    expect(formatAgo(100, 102)).toBe('just now');
    expect(formatAgo(100, 142)).toBe('42 s ago');
    expect(formatAgo(0, 300)).toBe('5 min ago');
    expect(formatAgo(0, 3 * 3600)).toBe('3 h ago');
    expect(formatAgo(0, 2 * 86400)).toBe('2 d ago');
  });
});

describe('names', () => {
  it('shows the notebook file name, else the short kernel id', () => {
    expect(notebookName('/home/ada/work/train.ipynb')).toBe('train.ipynb');
    expect(notebookName('C:\\work\\a.ipynb')).toBe('a.ipynb');
    expect(notebookName('')).toBe('');
    expect(kernelName(record())).toBe('train.ipynb');
    expect(kernelName(record({ notebook: '' }))).toBe('a3cbe111');
  });
});

describe('kernelStatus', () => {
  it('resident on a GPU with its size', () => {
    const status = kernelStatus(record());
    expect(status.text).toBe('GPU 1 · resident · 12.1 GiB');
    expect(status.state).toBe('resident');
    expect(status.busy).toBe(false);
    expect(status.label).toContain('resident on GPU 1');
  });

  it('offloaded with the bytes kept in host memory and on disk', () => {
    const status = kernelStatus(
      record({ state: 'offloaded', device: null, gpu_bytes: 0, host_bytes: 10 * GiB, disk_bytes: 2.1 * GiB })
    );
    expect(status.text).toBe('offloaded · 12.1 GiB');
    expect(status.label).toContain('host memory');
  });

  it('offloaded without a size when nothing was measured', () => {
    expect(kernelStatus(record({ state: 'offloaded', device: null, gpu_bytes: 0, booked_bytes: 0 })).text).toBe(
      'offloaded'
    );
  });

  it('queued with its place', () => {
    expect(kernelStatus(record({ state: 'queued', device: null }), 2).text).toBe('queued #2');
    expect(kernelStatus(record({ state: 'queued', device: null })).text).toBe('queued');
    expect(kernelStatus(record({ state: 'queued', device: null }), 2).label).toContain('number 2');
  });

  it('restoring and offloading are busy', () => {
    const restoring = kernelStatus(record({ state: 'restoring', device: 0 }));
    expect(restoring.text).toBe('restoring… → GPU 0');
    expect(restoring.busy).toBe(true);
    const offloading = kernelStatus(record({ state: 'offloading' }));
    expect(offloading.text).toBe('offloading…');
    expect(offloading.busy).toBe(true);
  });

  it('running, cold, spilled, error, pinned, and not in the pool', () => {
    expect(kernelStatus(record({ state: 'running', device: 0 })).text).toBe(
      'GPU 0 · running · 12.1 GiB'
    );
    expect(kernelStatus(record({ state: 'cold', device: null, gpu_bytes: 0, booked_bytes: 0 })).text).toBe(
      'GPU · not used'
    );
    expect(
      kernelStatus(record({ state: 'spilled', device: null, disk_bytes: 3 * GiB })).text
    ).toBe('spilled · 3 GiB');
    expect(kernelStatus(record({ state: 'error', device: null })).text).toBe('GPU · error');
    expect(kernelStatus(record({ pinned: true })).text).toBe('GPU 1 · resident · 12.1 GiB · pinned');
    const none = kernelStatus(null);
    expect(none.state).toBe('none');
    expect(none.label).toContain('not in the GPU pool');
  });
});

describe('estimateProgress', () => {
  it('grows with time at the measured rate and never claims to be done', () => {
    expect(estimateProgress(10e9, 0.1, 50e9)).toBeCloseTo(0.5);
    expect(estimateProgress(10e9, 10, 50e9)).toBe(0.95);
  });

  it('is unknown without a size or a rate', () => {
    expect(estimateProgress(0, 1, 50e9)).toBeNull();
    expect(estimateProgress(10e9, 1, null)).toBeNull();
  });
});

describe('kernelActivity', () => {
  it('pairs offloading/offloaded and restoring/resident, newest first, with durations', () => {
    const events = [
      ev(100, null, 'cold', null),
      ev(101, 'cold', 'running', 0),
      ev(102, 'running', 'resident', 0),
      ev(110, 'resident', 'offloading', 0),
      ev(110.2, 'offloading', 'offloaded', null),
      ev(120, 'offloaded', 'restoring', 0),
      ev(120.25, 'restoring', 'resident', 0)
    ].reverse(); // the server sends them newest first
    const activity = kernelActivity(record({ device: 0, gpu_bytes: 10e9 }), events);
    expect(activity.map(a => a.kind)).toEqual(['restore', 'offload']);
    const [restore, offload] = activity;
    expect(restore.duration).toBeCloseTo(0.25);
    expect(restore.to).toBe(0);
    expect(restore.bytes).toBe(10e9); // the latest restore borrows the record's GPU bytes
    expect(formatRate(restore.bytes, restore.duration)).toBe('40.0 GB/s');
    expect(offload.duration).toBeCloseTo(0.2);
    expect(offload.from).toBe(0);
    expect(offload.bytes).toBeNull(); // the record holds no host copy any more
  });

  it('uses the measured nbytes and duration when the server gives them', () => {
    const events = [
      ev(10, 'resident', 'offloading', 1),
      ev(11, 'offloading', 'offloaded', null, { nbytes: 8e9, duration: 0.148 })
    ];
    const [offload] = kernelActivity(
      record({ state: 'offloaded', device: null, host_bytes: 8e9 }),
      events
    );
    expect(offload.bytes).toBe(8e9);
    expect(offload.duration).toBe(0.148);
    expect(formatRate(offload.bytes, offload.duration)).toBe('54.1 GB/s');
  });

  it('takes the latest offload size from the host copy', () => {
    const events = [ev(10, 'resident', 'offloading', 1), ev(12, 'offloading', 'offloaded', null)];
    const [offload] = kernelActivity(
      record({ state: 'offloaded', device: null, host_bytes: 6e9, disk_bytes: 0 }),
      events
    );
    expect(offload.bytes).toBe(6e9);
    expect(offload.duration).toBe(2);
  });

  it('calls a restore onto another device a migration', () => {
    const events = [
      ev(10, 'resident', 'offloading', 0),
      ev(11, 'offloading', 'offloaded', null),
      ev(20, 'queued', 'restoring', 1),
      ev(21, 'restoring', 'running', 1)
    ];
    const [migration] = kernelActivity(record({ state: 'running', device: 1 }), events);
    expect(migration.kind).toBe('migration');
    expect(migration.from).toBe(0);
    expect(migration.to).toBe(1);
  });

  it('marks a refused offload and a failed restore', () => {
    const events = [
      ev(10, 'resident', 'offloading', 0),
      ev(11, 'offloading', 'resident', 0),
      ev(20, 'resident', 'offloading', 0),
      ev(21, 'offloading', 'offloaded', null),
      ev(30, 'offloaded', 'restoring', 0),
      ev(31, 'restoring', 'error', null)
    ];
    const activity = kernelActivity(record({ state: 'error', device: null }), events);
    expect(activity.map(a => [a.kind, a.failed])).toEqual([
      ['restore', true],
      ['offload', false],
      ['offload', true]
    ]);
  });

  it('ignores unpaired transitions', () => {
    expect(kernelActivity(record(), [ev(1, 'resident', 'offloading', 0)])).toEqual([]);
    expect(kernelActivity(record(), [])).toEqual([]);
  });
});

describe('errorMessage', () => {
  it('reads the message of errors and falls back to text', () => {
    expect(errorMessage(new Error('nope'))).toBe('nope');
    expect(errorMessage('plain')).toBe('plain');
    expect(errorMessage({ message: '' })).toBe('[object Object]');
  });
});
