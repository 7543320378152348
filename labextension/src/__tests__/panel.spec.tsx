/**
 * The panel as an admin and as a non-admin sees it: which kernels are marked as mine, which carry
 * buttons, and whether the quota editor is there.
 */

import { Widget } from '@lumino/widgets';

import { IPoolAPI } from '../api';
import { PoolModel } from '../model';
import { PoolPanel } from '../panel';
import { IKernelDetail, IKernelRecord, IMe, IPool, IQuota, IQuotas } from '../types';
import { GiB, kernelRecord } from './records';

function kernel(id: string, user: string, overrides: Partial<IKernelRecord> = {}): IKernelRecord {
  return kernelRecord(id, { user, ...overrides });
}

/** A pool of ada's and bob's kernels; `me_` says who asks (or the error the server gives). */
class FakeAPI implements IPoolAPI {
  calls: string[] = [];
  constructor(readonly me_: IMe | Error) {}
  pool_: IPool = {
    devices: [
      { index: 0, uuid: 'SIM-0', name: 'Simulated GPU', chip: 'sim', total_bytes: 16 * GiB, booked_bytes: 4 * GiB }
    ],
    kernels: [
      kernel('mine-on-gpu', 'ada'),
      kernel('bobs-on-gpu', 'bob'),
      kernel('mine-off', 'ada', { state: 'offloaded', device: null, gpu_bytes: 0, booked_bytes: 0, host_bytes: GiB }),
      kernel('bobs-off', 'bob', { state: 'offloaded', device: null, gpu_bytes: 0, booked_bytes: 0, host_bytes: GiB })
    ],
    queue: [],
    time: 1000
  };

  async pool(): Promise<IPool> {
    return JSON.parse(JSON.stringify(this.pool_));
  }
  async quota(): Promise<IQuota> {
    return {
      user: 'ada',
      limits: { gpu_memory: null, gpu_seconds_per_day: null, max_resident_kernels: null, host_memory: null, priority: 1 },
      usage: { gpu_seconds_today: 0, gpu_bytes: 2 * GiB, host_bytes: GiB, resident_kernels: 1 }
    };
  }
  async me(): Promise<IMe> {
    if (this.me_ instanceof Error) {
      throw this.me_;
    }
    return { ...this.me_ };
  }
  async kernel(id: string): Promise<IKernelDetail> {
    return { ...this.pool_.kernels.find(k => k.kernel_id === id)!, events: [] };
  }
  async offload(id: string): Promise<IKernelDetail> {
    this.calls.push(`offload ${id}`);
    return this.kernel(id);
  }
  async restore(id: string): Promise<IKernelDetail> {
    this.calls.push(`restore ${id}`);
    return this.kernel(id);
  }
  async pin(id: string, pinned: boolean): Promise<IKernelDetail> {
    this.calls.push(`pin ${id} ${pinned}`);
    return this.kernel(id);
  }
  async quotas(): Promise<IQuotas> {
    return { quotas: {}, source: 'config', error: null };
  }
  async setQuotas(): Promise<IQuotas> {
    return { quotas: {}, source: 'config', error: null };
  }
}

async function render(me: IMe | Error): Promise<{ panel: PoolPanel; api: FakeAPI }> {
  const api = new FakeAPI(me);
  const model = new PoolModel(api, { debounce: 10 });
  await model.refresh();
  const panel = new PoolPanel({ model });
  Widget.attach(panel, document.body);
  panel.update();
  await waitFor(() => panel.node.querySelector('.jp-singularity-device') !== null);
  return { panel, api };
}

async function waitFor(condition: () => boolean, timeout = 2000): Promise<void> {
  const start = Date.now();
  while (!condition()) {
    if (Date.now() - start > timeout) {
      throw new Error('timed out waiting for the panel to render');
    }
    await new Promise(resolve => setTimeout(resolve, 10));
  }
}

function row(panel: PoolPanel, kernelId: string): HTMLElement {
  const el = panel.node.querySelector(`li.jp-singularity-kernel[data-kernel-id="${kernelId}"]`);
  expect(el).not.toBeNull();
  return el as HTMLElement;
}

function buttons(panel: PoolPanel, kernelId: string): string[] {
  return Array.from(row(panel, kernelId).querySelectorAll('button')).map(b => b.textContent ?? '');
}

const quotaEditor = (panel: PoolPanel) =>
  panel.node.querySelector('.jp-singularity-quota-editor');

describe('PoolPanel', () => {
  let panel: PoolPanel | null = null;
  afterEach(() => {
    panel?.model.dispose();
    panel?.dispose();
    panel = null;
  });

  it('shows a non-admin actions on their own kernels only, and no quota editor', async () => {
    const rendered = await render({ user: 'ada', username: 'ada', admin: false });
    panel = rendered.panel;
    expect(buttons(panel, 'mine-on-gpu')).toEqual(['Offload', 'Pin']);
    expect(buttons(panel, 'mine-off')).toEqual(['Restore', 'Pin']);
    expect(buttons(panel, 'bobs-on-gpu')).toEqual([]);
    expect(buttons(panel, 'bobs-off')).toEqual([]);
    expect(row(panel, 'bobs-on-gpu').querySelector('.jp-singularity-actions')).toBeNull();
    // Bob's kernels are still listed, with their owner.
    expect(row(panel, 'bobs-off').textContent).toContain('bob');
    expect(quotaEditor(panel)).toBeNull();
    expect(panel.node.querySelector('.jp-singularity-admin-badge')).toBeNull();
    // The non-admin's own quota is still shown.
    expect(panel.node.querySelector('.jp-singularity-quota')).not.toBeNull();
  });

  it('marks my own kernels', async () => {
    const rendered = await render({ user: 'ada', username: 'ada', admin: false });
    panel = rendered.panel;
    const mine = row(panel, 'mine-on-gpu');
    expect(mine.dataset.mine).toBe('true');
    expect(mine.classList.contains('jp-mod-mine')).toBe(true);
    expect(mine.querySelector('.jp-singularity-owner')!.textContent).toBe('ada (you)');
    expect(mine.getAttribute('aria-label')).toContain('ada (you)');
    const bobs = row(panel, 'bobs-on-gpu');
    expect(bobs.dataset.mine).toBe('false');
    expect(bobs.classList.contains('jp-mod-mine')).toBe(false);
    expect(bobs.querySelector('.jp-singularity-owner')!.textContent).toBe('bob');
  });

  it('shows an admin actions on every kernel, the quota editor and an admin badge', async () => {
    const rendered = await render({ user: 'ada', username: 'ada', admin: true });
    panel = rendered.panel;
    expect(buttons(panel, 'mine-on-gpu')).toEqual(['Offload', 'Pin']);
    expect(buttons(panel, 'bobs-on-gpu')).toEqual(['Offload', 'Pin']);
    expect(buttons(panel, 'bobs-off')).toEqual(['Restore', 'Pin']);
    expect(
      row(panel, 'bobs-on-gpu').querySelector('.jp-singularity-actions')!.getAttribute('title')
    ).toBe("bob's kernel: you act on it as an admin");
    expect(row(panel, 'mine-on-gpu').querySelector('.jp-singularity-actions')!.hasAttribute('title')).toBe(false);
    expect(quotaEditor(panel)?.querySelector('summary')?.textContent).toBe('Quotas (admin)');
    expect(panel.node.querySelector('.jp-singularity-admin-badge')?.textContent).toBe('admin');
    // Still only my own kernels are marked as mine.
    expect(row(panel, 'bobs-on-gpu').dataset.mine).toBe('false');

    // An admin's button on another user's kernel calls the API.
    const offload = Array.from(row(panel, 'bobs-on-gpu').querySelectorAll('button')).find(
      b => b.textContent === 'Offload'
    )!;
    offload.click();
    await waitFor(() => rendered.api.calls.includes('offload bobs-on-gpu'));
  });

  it('treats a server that cannot say who I am as a non-admin', async () => {
    const rendered = await render(new Error('not found'));
    panel = rendered.panel;
    // The quota's user still tells my kernels apart.
    expect(buttons(panel, 'mine-on-gpu')).toEqual(['Offload', 'Pin']);
    expect(buttons(panel, 'bobs-on-gpu')).toEqual([]);
    expect(quotaEditor(panel)).toBeNull();
    expect(panel.model.error).toBeNull();
  });
});
