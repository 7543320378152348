/**
 * The history model: which windows it asks the server for, and what it keeps when a request fails.
 */

import { IHistoryAPI, PoolAPIError } from '../api';
import { HistoryModel, WEEK_DAYS } from '../history';
import { IGpuTime, ITimeline } from '../types';

class FakeHistory implements IHistoryAPI {
  asked: string[] = [];
  fail: Error | null = null;
  async timeline(since: number, until: number): Promise<ITimeline> {
    this.asked.push(`timeline ${since} ${until}`);
    if (this.fail) {
      throw this.fail;
    }
    return { since, until, now: until, devices: [], leases: [], changes: [], kernels: {}, truncated: false };
  }
  async gpuTime(days: number): Promise<IGpuTime> {
    this.asked.push(`gpu-time ${days}`);
    return { user: 'ada', now: 0, gpu_seconds_per_day: null, days: [] };
  }
}

describe('HistoryModel', () => {
  it('asks for the last hours up to now and the week', async () => {
    const api = new FakeHistory();
    const model = new HistoryModel(api, { clock: () => 100_000.7 });
    let changes = 0;
    model.changed.connect(() => changes++);
    await model.refresh();
    expect(api.asked).toEqual([`timeline ${100_000 - 6 * 3600} 100000`, `gpu-time ${WEEK_DAYS}`]);
    expect(model.timeline?.until).toBe(100_000);
    expect(model.gpuTime?.user).toBe('ada');
    expect(model.error).toBeNull();
    expect(changes).toBe(1);

    model.hours = 1;
    await model.refresh();
    expect(api.asked).toContain(`timeline ${100_000 - 3600} 100000`);
    model.dispose();
  });

  it('keeps what it had and says why when the server refuses', async () => {
    const api = new FakeHistory();
    const model = new HistoryModel(api, { clock: () => 5000 });
    await model.refresh();
    api.fail = new PoolAPIError('since (1) must be before until (0)', 400);
    await model.refresh();
    expect(model.error).toBe('Cannot read the GPU history: since (1) must be before until (0)');
    expect(model.timeline?.until).toBe(5000);
    expect(model.gpuTime).not.toBeNull();
    model.dispose();
  });

  it('merges a burst of refreshSoon calls into one request', async () => {
    jest.useFakeTimers();
    try {
      const api = new FakeHistory();
      const model = new HistoryModel(api, { debounce: 500, clock: () => 5000 });
      model.refreshSoon();
      model.refreshSoon();
      model.refreshSoon();
      expect(api.asked).toEqual([]);
      jest.advanceTimersByTime(500);
      await Promise.resolve();
      expect(api.asked.filter(a => a.startsWith('timeline'))).toHaveLength(1);
      model.dispose();
    } finally {
      jest.useRealTimers();
    }
  });
});
