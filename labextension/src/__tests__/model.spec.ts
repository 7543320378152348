import { IPoolAPI, PoolAPIError } from '../api';
import { gauge, PoolModel } from '../model';
import {
  IKernelDetail,
  IMe,
  IPool,
  IQuota,
  IQuotas,
  KERNEL_STATE_SCHEMA,
  LEASE_SCHEMA
} from '../types';
import { GiB, kernelRecord as kernel } from './records';


/** An in-memory server: enough of the broker's behaviour to drive the model. */
class FakeAPI implements IPoolAPI {
  calls: string[] = [];
  failPool: Error | null = null;
  failMe: Error | null = null;
  refuse: Error | null = null;
  pool_: IPool = {
    devices: [
      { index: 0, uuid: 'SIM-0', name: 'Simulated GPU', chip: 'sim', total_bytes: 16 * GiB, booked_bytes: 0 },
      { index: 1, uuid: 'SIM-1', name: 'Simulated GPU', chip: 'sim', total_bytes: 16 * GiB, booked_bytes: 0 }
    ],
    kernels: [
      kernel('k1'),
      kernel('k2', { gpu_bytes: 6 * GiB, booked_bytes: 6 * GiB }),
      kernel('k3', { user: 'bob', device: 1 }),
      kernel('k4', { state: 'offloaded', device: null, gpu_bytes: 0, booked_bytes: 0, host_bytes: 3 * GiB }),
      kernel('k5', { state: 'queued', device: null, gpu_bytes: 0, booked_bytes: 0 })
    ],
    queue: [
      { kernel_id: 'k5', request_id: 'r1', position: 1, reason: 'waits for 8 GiB on GPU 0', memory: 8 * GiB, device: 0 }
    ],
    time: 1000
  };
  quota_: IQuota = {
    user: 'ada',
    limits: { gpu_memory: 16 * GiB, gpu_seconds_per_day: 4 * 3600, max_resident_kernels: null, host_memory: null, priority: 1 },
    usage: { gpu_seconds_today: 3600, gpu_bytes: 8 * GiB, host_bytes: 3 * GiB, resident_kernels: 2 }
  };

  async pool(): Promise<IPool> {
    this.calls.push('pool');
    if (this.failPool) {
      throw this.failPool;
    }
    return JSON.parse(JSON.stringify(this.pool_));
  }
  me_: IMe = { user: 'ada', username: 'ada', admin: false };

  async quota(): Promise<IQuota> {
    this.calls.push('quota');
    return JSON.parse(JSON.stringify(this.quota_));
  }
  async me(): Promise<IMe> {
    this.calls.push('me');
    if (this.failMe) {
      throw this.failMe;
    }
    return { ...this.me_ };
  }
  async kernel(id: string): Promise<IKernelDetail> {
    this.calls.push(`kernel ${id}`);
    const record = this.pool_.kernels.find(k => k.kernel_id === id);
    if (!record) {
      throw new PoolAPIError(`no kernel ${id} in the GPU pool`, 404);
    }
    return { ...record, events: [] };
  }
  async offload(id: string): Promise<IKernelDetail> {
    this.calls.push(`offload ${id}`);
    if (this.refuse) {
      throw this.refuse;
    }
    const k = this.pool_.kernels.find(k => k.kernel_id === id)!;
    k.state = 'offloading';
    return { ...k, events: [] };
  }
  async restore(id: string): Promise<IKernelDetail> {
    this.calls.push(`restore ${id}`);
    const k = this.pool_.kernels.find(k => k.kernel_id === id)!;
    k.state = 'restoring';
    k.device = 0;
    return { ...k, events: [] };
  }
  async pin(id: string, pinned: boolean): Promise<IKernelDetail> {
    this.calls.push(`pin ${id} ${pinned}`);
    const k = this.pool_.kernels.find(k => k.kernel_id === id)!;
    k.pinned = pinned;
    return { ...k, events: [] };
  }
  async quotas(): Promise<IQuotas> {
    return { quotas: {}, source: 'config', error: null };
  }
  async setQuotas(quotas: Record<string, unknown>): Promise<IQuotas> {
    if (this.refuse) {
      throw this.refuse;
    }
    return { quotas: quotas as IQuotas['quotas'], source: 'config', error: null };
  }
}

async function loaded(api = new FakeAPI(), options: PoolModel.IOptions = {}) {
  const model = new PoolModel(api, { debounce: 10, ...options });
  await model.refresh();
  return { api, model };
}

describe('PoolModel', () => {
  afterEach(() => {
    jest.useRealTimers();
  });

  it('reads the pool, my quota and my kernels (not others\') histories', async () => {
    const { api, model } = await loaded();
    expect(model.loaded).toBe(true);
    expect(model.user).toBe('ada');
    expect(model.kernels).toHaveLength(5);
    expect(api.calls.filter(c => c.startsWith('kernel')).sort()).toEqual([
      'kernel k1',
      'kernel k2',
      'kernel k4',
      'kernel k5'
    ]);
    expect(model.detail('k1')?.kernel_id).toBe('k1');
    expect(model.detail('k3')).toBeNull();
  });

  it('stacks each device\'s kernels by size with their share of memory', async () => {
    const { model } = await loaded();
    const [gpu0, gpu1] = model.devices;
    const segments = model.segments(gpu0);
    expect(segments.map(s => s.kernel.kernel_id)).toEqual(['k2', 'k1']);
    expect(segments[0].fraction).toBeCloseTo(6 / 16);
    expect(segments[1].bytes).toBe(2 * GiB);
    expect(model.segments(gpu1).map(s => s.kernel.user)).toEqual(['bob']);
    expect(model.offDevice().map(k => k.kernel_id)).toEqual(['k4', 'k5']);
  });

  it('knows queue positions and whose kernels are mine', async () => {
    const { model } = await loaded();
    expect(model.queuePosition('k5')).toBe(1);
    expect(model.queuePosition('k1')).toBeNull();
    expect(model.isMine(model.kernel('k1')!)).toBe(true);
    expect(model.isMine(model.kernel('k3')!)).toBe(false);
    expect(model.kernel('nope')).toBeNull();
    expect(model.kernel(null)).toBeNull();
  });

  it('knows who I am, and lets only an admin act on others\' kernels', async () => {
    const { api, model } = await loaded();
    expect(api.calls).toContain('me');
    expect(model.me).toEqual({ user: 'ada', username: 'ada', admin: false });
    expect(model.isAdmin).toBe(false);
    expect(model.canAct(model.kernel('k1')!)).toBe(true);
    expect(model.canAct(model.kernel('k3')!)).toBe(false);

    api.me_ = { user: 'ada', username: 'root', admin: true };
    await model.refresh();
    expect(model.isAdmin).toBe(true);
    expect(model.isMine(model.kernel('k3')!)).toBe(false);
    expect(model.canAct(model.kernel('k3')!)).toBe(true);
  });

  it('takes "me" over the quota\'s user, and is no admin until the server says so', async () => {
    const api = new FakeAPI();
    api.me_ = { user: 'bob', username: 'bob', admin: false };
    const { model } = await loaded(api);
    expect(model.user).toBe('bob');
    expect(model.isMine(model.kernel('k3')!)).toBe(true);
    expect(model.isMine(model.kernel('k1')!)).toBe(false);

    const old = new FakeAPI();
    old.failMe = new PoolAPIError('not found', 404);
    const fallback = (await loaded(old)).model;
    expect(fallback.loaded).toBe(true);
    expect(fallback.error).toBeNull();
    expect(fallback.user).toBe('ada'); // from the quota
    expect(fallback.isAdmin).toBe(false);
    expect(fallback.canAct(fallback.kernel('k3')!)).toBe(false);

    const before = new PoolModel(new FakeAPI());
    expect(before.isAdmin).toBe(false);
    expect(before.user).toBeNull();
  });

  it('turns my quota into gauges', async () => {
    const { model } = await loaded();
    const g = model.gauges()!;
    expect(g.memory.fraction).toBeCloseTo(0.5);
    expect(g.memory.full).toBe(false);
    expect(g.hours.fraction).toBeCloseTo(0.25);
    expect(g.kernels.limit).toBeNull();
  });

  it('draws unlimited gauges against a scale, and full ones as full', () => {
    expect(gauge(8, null, 32)).toEqual({ value: 8, limit: null, fraction: 0.25, full: false });
    expect(gauge(5, 4, 100)).toEqual({ value: 5, limit: 4, fraction: 1, full: true });
    expect(gauge(0, 0, 10).fraction).toBe(0);
  });

  it('ignores events of other schemas', async () => {
    const { api, model } = await loaded();
    const before = api.calls.length;
    expect(model.handleEvent({ schema_id: 'https://events.jupyter.org/jupyter_server/contents_service/actions/v1' })).toBe(false);
    await new Promise(r => setTimeout(r, 30));
    expect(api.calls.length).toBe(before);
  });

  it('patches a state change at once, then refreshes once per burst', async () => {
    jest.useFakeTimers();
    const { api, model } = await loaded();
    const changed = jest.fn();
    model.changed.connect(changed);
    const before = api.calls.filter(c => c === 'pool').length;
    expect(
      model.handleEvent({
        schema_id: KERNEL_STATE_SCHEMA,
        kernel_id: 'k1',
        user: 'ada',
        old: 'resident',
        new: 'offloading',
        device: 0,
        reason: 'requested by user'
      })
    ).toBe(true);
    model.handleEvent({ schema_id: LEASE_SCHEMA, kernel_id: 'k2', action: 'ended' });
    expect(model.kernel('k1')!.state).toBe('offloading');
    expect(model.enteredAt('k1')).not.toBeNull();
    expect(changed).toHaveBeenCalled();
    api.pool_.kernels[0].state = 'offloaded';
    jest.advanceTimersByTime(20);
    jest.useRealTimers();
    await new Promise(r => setTimeout(r, 30));
    expect(api.calls.filter(c => c === 'pool').length).toBe(before + 1);
    expect(model.kernel('k1')!.state).toBe('offloaded');
  });

  it('drops a kernel that left the pool', async () => {
    const { model } = await loaded();
    model.handleEvent({ schema_id: KERNEL_STATE_SCHEMA, kernel_id: 'k1', user: 'ada', old: 'resident', new: null, device: null, reason: 'kernel shut down' });
    expect(model.kernel('k1')).toBeNull();
    expect(model.detail('k1')).toBeNull();
  });

  it('merges refreshes asked for while one runs', async () => {
    const api = new FakeAPI();
    const model = new PoolModel(api);
    await Promise.all([model.refresh(), model.refresh(), model.refresh()]);
    expect(api.calls.filter(c => c === 'pool').length).toBe(2);
  });

  it('says why the pool cannot be read, and recovers', async () => {
    const api = new FakeAPI();
    api.failPool = new PoolAPIError('not found: is jupyter-singularity enabled on this server?', 404);
    const model = new PoolModel(api);
    await model.refresh();
    expect(model.loaded).toBe(false);
    expect(model.error).toContain('is jupyter-singularity enabled');
    api.failPool = null;
    await model.refresh();
    expect(model.error).toBeNull();
    expect(model.loaded).toBe(true);
  });

  it('offloads, restores and pins through the API and applies the answer', async () => {
    const { api, model } = await loaded();
    expect(await model.offload('k1')).toBe(true);
    expect(model.kernel('k1')!.state).toBe('offloading');
    expect(await model.restore('k4')).toBe(true);
    expect(model.kernel('k4')!.state).toBe('restoring');
    expect(await model.pin('k2', true)).toBe(true);
    expect(model.kernel('k2')!.pinned).toBe(true);
    expect(api.calls).toEqual(expect.arrayContaining(['offload k1', 'restore k4', 'pin k2 true']));
    expect(model.pending('k1')).toBeNull();
  });

  it('shows the server\'s own words when it refuses an action', async () => {
    const { api, model } = await loaded();
    api.refuse = new PoolAPIError('kernel is running: only an idle resident kernel can be offloaded', 409);
    expect(await model.offload('k1')).toBe(false);
    expect(model.actionError).toEqual({
      kernelId: 'k1',
      action: 'offload',
      message: 'Could not offload k1.ipynb: kernel is running: only an idle resident kernel can be offloaded'
    });
    model.clearActionError();
    expect(model.actionError).toBeNull();
  });

  it('reports a pending action while it runs', async () => {
    const { api, model } = await loaded();
    let release: () => void = () => undefined;
    api.offload = async (id: string) => {
      await new Promise<void>(r => (release = r));
      return { ...kernel(id, { state: 'offloading' }), events: [] };
    };
    const done = model.offload('k1');
    expect(model.pending('k1')).toBe('offload');
    release();
    await done;
    expect(model.pending('k1')).toBeNull();
  });

  it('derives recent transfers and rates from my kernels\' histories', async () => {
    const api = new FakeAPI();
    api.kernel = async (id: string) => {
      const record = api.pool_.kernels.find(k => k.kernel_id === id)!;
      const events =
        id === 'k1'
          ? [
              { time: 51, kernel_id: id, user: 'ada', old_state: 'restoring', new_state: 'resident', reason: 'restored', device_index: 0, nbytes: 2e9, duration: 0.04 },
              { time: 50, kernel_id: id, user: 'ada', old_state: 'offloaded', new_state: 'restoring', reason: 'requested', device_index: 0 },
              { time: 41, kernel_id: id, user: 'ada', old_state: 'offloading', new_state: 'offloaded', reason: 'offload finished', device_index: null, nbytes: 2e9, duration: 0.05 },
              { time: 40, kernel_id: id, user: 'ada', old_state: 'resident', new_state: 'offloading', reason: 'idle', device_index: 0 }
            ]
          : [];
      return { ...record, events };
    };
    const { model } = await loaded(api);
    const activity = model.activity();
    expect(activity.map(a => a.kind)).toEqual(['restore', 'offload']);
    expect(model.lastRate('k1', 'restore')).toBeCloseTo(50e9);
    expect(model.lastRate('k2', 'offload')).toBeCloseTo(40e9); // borrowed from another kernel
  });

  it('saves quotas and passes a refusal on', async () => {
    const { api, model } = await loaded();
    expect((await model.saveQuotas({ default: { gpu_memory: '8GiB' } })).quotas).toEqual({
      default: { gpu_memory: '8GiB' }
    });
    api.refuse = new PoolAPIError("only an admin may change quotas (permission 'write' on 'singularity-admin')", 403);
    await expect(model.saveQuotas({})).rejects.toThrow('only an admin may change quotas');
  });

  it('names kernels by their session\'s current notebook when the frontend knows it', async () => {
    const { model } = await loaded(new FakeAPI(), {
      notebookPath: id => (id === 'k1' ? 'renamed/trainer.ipynb' : null)
    });
    expect(model.displayName(model.kernel('k1')!)).toBe('trainer.ipynb');
    expect(model.notebook(model.kernel('k1')!)).toBe('renamed/trainer.ipynb');
    expect(model.displayName(model.kernel('k2')!)).toBe('k2.ipynb');
    const changed = jest.fn();
    model.changed.connect(changed);
    model.touch();
    expect(changed).toHaveBeenCalledTimes(1);
  });

  it('gives kernels side by side different colours, stable across refreshes', async () => {
    const { model } = await loaded();
    const slots = model.kernels.map(k => model.colourSlot(k.kernel_id));
    expect(new Set(slots).size).toBe(5);
    await model.refresh();
    expect(model.kernels.map(k => model.colourSlot(k.kernel_id))).toEqual(slots);
  });

  it('stops after dispose', async () => {
    const { api, model } = await loaded();
    model.dispose();
    expect(model.isDisposed).toBe(true);
    expect(model.handleEvent({ schema_id: KERNEL_STATE_SCHEMA, kernel_id: 'k1', new: 'offloaded' })).toBe(false);
    const calls = api.calls.length;
    await new Promise(r => setTimeout(r, 30));
    expect(api.calls.length).toBe(calls);
  });
});
