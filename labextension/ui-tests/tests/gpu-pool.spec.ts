/**
 * The GPU pool in a real JupyterLab and a real Chromium, on one simulated 2 GiB GPU, with real
 * torch cells.
 *
 * On simulated devices the kernel runtime treats a kernel's first `import torch` as its first GPU
 * use (it takes a lease) and the kernel's large CPU tensors (>= 1 MiB) as its "GPU" state, which
 * the broker offloads to host copies and restores, measuring bytes and seconds.
 *
 * Notebook 1 makes a 1 GiB tensor: the status bar says "resident · 1 GiB", the panel shows the
 * kernel's bar on GPU 0. The panel's Offload button offloads it (both say "offloaded · 1 GiB");
 * the notebook's next cell restores it (the status bar passes through "restoring…") and finds its
 * tensor intact; the panel's recent transfers show both moves with bytes, duration and GB/s.
 * Notebook 2 then makes a 1.5 GiB tensor: 1 + 1.5 GiB do not fit on the 2 GiB GPU, so the pool
 * offloads notebook 1's idle kernel to make room.
 *
 * The queue: while one notebook's cell runs, another's first GPU use waits in the middle of its
 * cell, its output saying where it is in the queue; the ■ interrupt makes it leave the queue, and a
 * wait that ends leaves no blank line behind.
 */

import { expect, IJupyterLabPageFixture, test } from '@jupyterlab/galata';
import type { Locator, TestInfo } from '@playwright/test';
import * as fs from 'fs';
import * as path from 'path';

import { openNotebook, runCell } from './notebooks';

const GiB = 2 ** 30;

/** The README's screenshot (panel and status bar), refreshed by each run. */
const DOCS_IMAGE = path.resolve(__dirname, '..', '..', '..', 'docs', 'images', 'panel.png');

/** A transfer in the panel's list: "GPU 0 → host · 1 GiB in 0.42 s · 2.6 GB/s". */
const MEASURED = (size: string) =>
  new RegExp(`· ${size.replace('.', '\\.')} in [\\d.]+ (s|min) · [\\d.]+ (GB|MB)/s`);

async function shot(page: IJupyterLabPageFixture, testInfo: TestInfo, name: string) {
  const file = testInfo.outputPath(`${name}.png`);
  await page.screenshot({ path: file });
  await testInfo.attach(name, { path: file, contentType: 'image/png' });
}

/** The status bar item (the `%singularity` widget's HTML has a class of the same name). */
function statusItem(page: IJupyterLabPageFixture): Locator {
  return page.locator('#jp-main-statusbar .jp-singularity-status');
}

/** Types `lines` into the active notebook's first cell and starts it, without waiting for it. */
async function startCell(page: IJupyterLabPageFixture, lines: string[]): Promise<void> {
  await page.notebook.setCell(0, 'code', lines.join('\n'));
  await page.evaluate(() => {
    void (window as any).galata.app.commands.execute('notebook:run-cell');
  });
}

/** The first cell's output area in the visible notebook. */
function firstOutput(page: IJupyterLabPageFixture): Locator {
  return page
    .locator('.jp-NotebookPanel')
    .filter({ visible: true })
    .locator('.jp-Cell')
    .first()
    .locator('.jp-OutputArea');
}

/** The kernel's record with its ledger events, as the panel reads it. */
async function kernelRecord(page: IJupyterLabPageFixture, kernelId: string): Promise<any> {
  const response = await page.request.get(`/singularity/api/kernels/${kernelId}`);
  expect(response.ok()).toBeTruthy();
  return response.json();
}

/** The kernel's ledger events, newest first. */
function newestFirst(record: any): any[] {
  return [...record.events].sort((a: any, b: any) => b.time - a.time || (b.id ?? 0) - (a.id ?? 0));
}

/** The latest ledger event that ends a transfer `from` → `to`, with the measured bytes and seconds. */
function transferEvent(record: any, from: string, to: string): any {
  return newestFirst(record).find(
    (e: any) => e.old_state === from && e.new_state === to && e.nbytes
  );
}

/** Starts recording what the status bar shows, each change of state or text, in order. */
async function watchStatusBar(page: IJupyterLabPageFixture): Promise<void> {
  await page.evaluate(() => {
    const w = window as any;
    w.__singularitySeen = [];
    w.__singularityObserver?.disconnect();
    const record = () => {
      const el = document.querySelector('.jp-singularity-status') as HTMLElement | null;
      if (!el) {
        return;
      }
      const seen = { state: el.dataset.state ?? '', text: el.textContent ?? '' };
      const last = w.__singularitySeen[w.__singularitySeen.length - 1];
      if (!last || last.state !== seen.state || last.text !== seen.text) {
        w.__singularitySeen.push(seen);
      }
    };
    const observer = new MutationObserver(record);
    observer.observe(document.querySelector('#jp-main-statusbar') ?? document.body, {
      subtree: true,
      childList: true,
      attributes: true,
      characterData: true
    });
    w.__singularityObserver = observer;
    record();
  });
}

async function statusBarSeen(
  page: IJupyterLabPageFixture
): Promise<{ state: string; text: string }[]> {
  return page.evaluate(() => {
    const w = window as any;
    w.__singularityObserver?.disconnect();
    return w.__singularitySeen ?? [];
  });
}

// Galata's user mock answers every URL matching /api/me, the pool's /singularity/api/me too:
// the real server says who the user is (and that the default authorizer makes them an admin).
test.use({ viewport: { width: 1280, height: 800 }, mockUser: false });

test.describe('GPU pool', () => {
  test('two notebooks time-share one GPU: torch cells, offload, restore, eviction', async ({
    page,
    tmpPath
  }, testInfo) => {
    await openNotebook(page, tmpPath, 'gpu-pool.ipynb');
    await runCell(page, ['print("warm")'], 'warm');

    // The notebook's kernel is in the pool, not yet on a GPU.
    const status = statusItem(page);
    await expect(status).toBeVisible();
    await expect(status).toHaveAttribute('data-state', 'cold');
    const kernelId = (await status.getAttribute('data-kernel-id')) as string;
    expect(kernelId).toBeTruthy();
    await expect(status).toHaveAttribute('aria-label', /GPU pool: .*Open the GPU pool panel/);

    // A torch cell: its `import torch` takes a lease, its 1 GiB tensor is the kernel's GPU state.
    await runCell(
      page,
      [
        'import torch',
        'x = torch.randn(256, 1024, 1024)  # 1 GiB of float32',
        'checksum = float(x.sum())',
        'print(f"x: {x.nbytes >> 20} MiB")'
      ],
      'x: 1024 MiB'
    );
    await expect(status).toHaveAttribute('data-state', 'resident');
    await expect(status).toContainText('GPU 0 · resident · 1 GiB');
    await shot(page, testInfo, '01-status-resident');

    // The status item opens the panel, which shows the kernel's bar on its device.
    await status.click();
    const panel = page.locator('#jp-singularity-pool');
    await expect(panel).toBeVisible();
    const device = panel.locator('.jp-singularity-device[data-device="0"]');
    const segment = device.locator(`.jp-singularity-segment[data-kernel-id="${kernelId}"]`);
    await expect(segment).toHaveAttribute('data-state', 'resident');
    const width = await segment.evaluate(el => (el as HTMLElement).style.width);
    expect(parseFloat(width)).toBeCloseTo(50, 0); // 1 of 2 GiB
    await expect(device).toContainText('1 GiB / 2 GiB');
    const row = panel.locator(`li.jp-singularity-kernel[data-kernel-id="${kernelId}"]`);
    await expect(row).toContainText('gpu-pool.ipynb');
    await expect(row).toContainText('resident · 1 GiB');
    // The notebook's kernel is the user's own: marked so, with its buttons.
    await expect(row).toHaveAttribute('data-mine', 'true');
    await expect(row.locator('.jp-singularity-owner')).toContainText('(you)');
    await expect(panel.locator('.jp-singularity-gauge-hours')).toContainText('of 8.00 h');
    await shot(page, testInfo, '02-panel-resident');

    // Offload from the panel: both places say offloaded, with the size of the host copy.
    await row.getByRole('button', { name: /^Offload / }).click();
    await expect(status).toHaveAttribute('data-state', 'offloaded');
    await expect(status).toContainText('offloaded · 1 GiB');
    const offRow = panel.locator(
      `.jp-singularity-offdevice li.jp-singularity-kernel[data-kernel-id="${kernelId}"]`
    );
    await expect(offRow).toHaveAttribute('data-state', 'offloaded');
    await expect(offRow).toContainText('offloaded · 1 GiB');
    await expect(segment).toHaveCount(0);
    const transfers = (kind: string) =>
      panel.locator(`.jp-singularity-activity li[data-kind="${kind}"][data-kernel-id="${kernelId}"]`);
    await expect(transfers('offload')).toHaveCount(1);
    await expect(transfers('offload')).toContainText(
      /GPU 0 → host/
    );
    await expect(transfers('offload')).toContainText(
      MEASURED('1 GiB')
    );
    await expect(offRow.getByRole('button', { name: /^Restore / })).toBeVisible();
    await shot(page, testInfo, '03-offloaded');

    // The next cell (any cell: the kernel uses the GPU, so every cell is gated) restores the
    // tensor before it runs; the status bar passes through "restoring…" and ends resident.
    await watchStatusBar(page);
    await runCell(page, ['print("same", float(x.sum()) == checksum)'], 'same True');
    await expect(status).toHaveAttribute('data-state', 'resident');
    await expect(status).toContainText('GPU 0 · resident · 1 GiB');
    await expect(segment).toHaveAttribute('data-state', 'resident');
    await expect(row).toContainText('resident · 1 GiB');
    const seen = await statusBarSeen(page);
    console.log(`status bar during the restore: ${seen.map(s => s.text).join(' | ')}`);
    testInfo.annotations.push({
      type: 'status bar during the restore',
      description: seen.map(s => s.text).join(' | ')
    });
    const restoring = seen.filter(s => s.state === 'restoring');
    if (restoring.length) {
      // Shown long enough to be seen: it said so.
      expect(restoring[0].text).toContain('restoring…');
      const after = seen.slice(seen.indexOf(restoring[0]));
      expect(after.some(s => s.state === 'resident' || s.state === 'running')).toBeTruthy();
    }
    // Either way the kernel's ledger has the restore, with what the kernel measured.
    let record = await kernelRecord(page, kernelId);
    const offload = transferEvent(record, 'offloading', 'offloaded');
    const restore = transferEvent(record, 'restoring', 'running');
    expect(offload?.nbytes).toBe(GiB);
    expect(offload?.duration).toBeGreaterThan(0);
    expect(restore?.nbytes).toBe(GiB);
    expect(restore?.duration).toBeGreaterThan(0);

    // The panel's recent transfers: the offload and the restore, with bytes, duration and GB/s.
    const restored = transfers('restore');
    await expect(restored).toHaveCount(1);
    await expect(restored).toContainText(/host → GPU 0/);
    await expect(restored).toContainText(MEASURED('1 GiB'));
    await shot(page, testInfo, '04-restored');

    // Pin and unpin from the panel.
    await row.getByRole('button', { name: /^Pin / }).click();
    await expect(row.getByRole('button', { name: /^Unpin / })).toBeVisible();
    await expect(status).toContainText('pinned');
    await shot(page, testInfo, '05-pinned');
    await row.getByRole('button', { name: /^Unpin / }).click();
    await expect(row.getByRole('button', { name: /^Pin / })).toBeVisible();
    await expect(status).not.toContainText('pinned');

    // A second notebook wants 1.5 GiB of the 2 GiB GPU: its first torch cell waits while the
    // pool offloads notebook 1's idle kernel, then runs.
    await openNotebook(page, tmpPath, 'second.ipynb');
    await runCell(
      page,
      [
        'import torch',
        'y = torch.ones(384, 1024, 1024)  # 1.5 GiB of float32',
        'print(f"y: {y.nbytes >> 20} MiB")'
      ],
      'y: 1536 MiB'
    );
    await expect(status).toHaveAttribute('data-state', 'resident');
    await expect(status).toContainText('GPU 0 · resident · 1.5 GiB');
    const secondId = (await status.getAttribute('data-kernel-id')) as string;
    expect(secondId).not.toBe(kernelId);
    await expect(device.locator('.jp-singularity-segment')).toHaveCount(1);
    await expect(
      device.locator(`.jp-singularity-segment[data-kernel-id="${secondId}"]`)
    ).toHaveAttribute('data-state', 'resident');
    await expect(device).toContainText('1.5 GiB / 2 GiB');
    await expect(offRow).toHaveAttribute('data-state', 'offloaded');
    await expect(offRow).toContainText('offloaded · 1 GiB');
    await expect(transfers('offload')).toHaveCount(2);
    await expect(transfers('offload').first()).toContainText(
      MEASURED('1 GiB')
    );
    record = await kernelRecord(page, kernelId);
    expect(record.state).toBe('offloaded');
    expect(record.host_bytes).toBe(GiB);
    const evicted = newestFirst(record).find((e: any) => e.new_state === 'offloading');
    expect(evicted?.reason).toContain(`making room for kernel ${secondId.slice(0, 8)}`);

    // The README's screenshot: panel and status bar, with real sizes.
    fs.mkdirSync(path.dirname(DOCS_IMAGE), { recursive: true });
    await page.screenshot({ path: DOCS_IMAGE });
    await testInfo.attach('06-time-shared', { path: DOCS_IMAGE, contentType: 'image/png' });

    // Dark theme: same widgets, theme variables only.
    await page.theme.setDarkTheme();
    await expect(status).toContainText('resident');
    await shot(page, testInfo, '07-dark-theme');
    await page.theme.setLightTheme();
  });

  test('a refused action shows the server\'s message', async ({ page }, testInfo) => {
    await page.sidebar.openTab('jp-singularity-pool');
    const panel = page.locator('#jp-singularity-pool');
    await expect(panel.locator('.jp-singularity-device[data-device="0"]')).toBeVisible();
    // The default authorizer lets the server's user do everything: the server says it is an
    // admin, and the panel shows the admin badge and the quota editor.
    const me = await (await page.request.get('/singularity/api/me')).json();
    expect(me.admin).toBe(true);
    await expect(panel.locator('.jp-singularity-admin-badge')).toHaveText('admin');
    await panel.locator('summary', { hasText: 'Quotas (admin)' }).click();
    const editor = panel.locator('#jp-singularity-quota-json');
    await expect(editor).toHaveValue(/gpu_seconds_per_day/);

    await editor.fill('{"default": {"gpu_memroy": "8GiB"}}');
    await panel.getByRole('button', { name: 'Save quotas' }).click();
    const alert = panel.locator('.jp-singularity-quota-editor [role="alert"]');
    await expect(alert).toContainText("unknown resource 'gpu_memroy'");
    await shot(page, testInfo, '08-refused');

    await editor.fill('{"default": {"gpu_memory": "8GiB", "gpu_hours_per_day": 8}}');
    await panel.getByRole('button', { name: 'Save quotas' }).click();
    await expect(panel.locator('.jp-singularity-quota-editor [role="status"]')).toContainText(
      'Quotas saved'
    );
    await expect(panel.locator('.jp-singularity-gauge-memory')).toContainText('of 8 GiB');
  });
});

test.describe('GPU queue', () => {
  // Galata's kernel tracking proxies POST /api/kernels/*: the interrupt's empty 204 answer makes
  // it throw and leave the browser's request hanging. Interrupts need the real API.
  test.use({ kernels: null });

    test('a waiting cell shows its place in the queue, leaves it when interrupted, and its wait leaves no blank line', async ({
      page,
      tmpPath
    }, testInfo) => {
      // Notebook 1 holds the GPU with a running cell.
      await openNotebook(page, tmpPath, 'busy.ipynb');
      await runCell(page, ['import time, torch', 'print("ready")'], 'ready');
      const status = statusItem(page);
      await startCell(page, ['time.sleep(120)']);
      await expect(status).toHaveAttribute('data-state', 'running');

      // Notebook 2's first GPU use (its first `import torch`) comes after some output: it waits,
      // saying where it is in the queue, below what the cell printed before.
      await openNotebook(page, tmpPath, 'waiting.ipynb');
      const output = firstOutput(page);
      const cell = ['print("before")', 'import torch', 'print("after")'];
      await startCell(page, cell);
      await expect(output).toContainText('waits for a GPU lease, 1st in the GPU queue');
      await expect(output).toContainText('before');
      await shot(page, testInfo, '09-waiting');

      // Interrupted, the cell leaves the queue and does not go on.
      await page.evaluate(async () => {
        await (window as any).galata.app.commands.execute('notebook:interrupt-kernel');
      });
      await expect(output).toContainText('left the queue');
      await expect(output).not.toContainText('after');
      await expect(output).not.toContainText('waits for a GPU lease');
      const queue = await (await page.request.get('/singularity/api/pool')).json();
      expect(queue.queue).toEqual([]);

      // Notebook 3's first GPU use also waits mid-cell; once notebook 1's cell is interrupted,
      // it gets the GPU and runs to the end.
      await openNotebook(page, tmpPath, 'midcell.ipynb');
      await startCell(page, cell);
      await expect(output).toContainText('1st in the GPU queue');
      await page.notebook.activate('busy.ipynb');
      await page.evaluate(async () => {
        await (window as any).galata.app.commands.execute('notebook:interrupt-kernel');
      });
      await page.notebook.activate('midcell.ipynb');
      const stdout = output.locator(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stdout"]'
      );
      // Two stream outputs: the emptied wait line is still an output between them, but one
      // without a MIME type takes no room (no blank line, no prompt).
      await expect(stdout).toHaveText(['before', 'after']);
      await expect(output.locator('.jp-OutputArea-child')).toHaveCount(2);
      await expect(output).not.toContainText('waits for a GPU lease');
      await expect(status).toHaveAttribute('data-state', /resident|running/);
      await shot(page, testInfo, '10-ran-after-waiting');
    });
});
