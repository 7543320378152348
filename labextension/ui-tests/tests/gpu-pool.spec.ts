/**
 * The GPU pool in a real JupyterLab and a real Chromium, on one simulated 16 GiB GPU.
 *
 * A notebook runs a GPU cell: the status bar says "resident", the panel shows the kernel's bar on
 * GPU 0; the panel's Offload button offloads it (both say "offloaded"); the next GPU cell brings
 * it back (resident again).
 */

import { expect, IJupyterLabPageFixture, test } from '@jupyterlab/galata';
import type { Locator, TestInfo } from '@playwright/test';
import * as fs from 'fs';
import * as path from 'path';

/**
 * The cell that uses the GPU.
 *
 * `by-hand` (the default) takes and releases a lease through the kernel's broker client, as a
 * gated cell does; it works with the kernel runtime as it is today (and, once the runtime gates
 * every cell of a kernel that used the GPU, the gate's own lease does the same). `torch` runs an ordinary
 * torch cell, for when the runtime gates torch cells by itself (in simulated mode a large tensor
 * makes the kernel resident): switch with SINGULARITY_UI_GPU_CELL=torch.
 */
const GPU_CELLS: Record<string, (gib: number) => string> = {
  'by-hand': gib =>
    [
      'import uuid',
      'from jupyter_singularity.kernel.runtime import Runtime',
      'c = Runtime.current.client',
      'rid = uuid.uuid4().hex',
      `g = c.request("acquire", {"request_id": rid, "memory": ${gib} << 30})`,
      `r = c.request("release", {"request_id": rid, "peak_bytes": ${gib} << 30, "gpu_bytes": ${gib} << 30}) if g.get("granted") else None`,
      '# A kernel that the runtime already gates holds the lease for this very cell.',
      'print("lease " + "ok" if g.get("granted") or "already holds" in str(g.get("reason")) else g)'
    ].join('\n'),
  torch: gib =>
    [
      'import torch',
      `x = torch.ones(${gib * 256}, 1024, 1024)  # ${gib} GiB of float32`,
      'print("lease " + "ok" if float(x[0, 0, 0]) == 1.0 else "?")'
    ].join('\n')
};
const GPU_CELL_MODE = process.env.SINGULARITY_UI_GPU_CELL ?? 'by-hand';
const gpuCell = GPU_CELLS[GPU_CELL_MODE] ?? GPU_CELLS['by-hand'];

/** The README's screenshot (panel and status bar), refreshed by each run. */
const DOCS_IMAGE = path.resolve(__dirname, '..', '..', '..', 'docs', 'images', 'panel.png');

async function shot(page: IJupyterLabPageFixture, testInfo: TestInfo, name: string) {
  const file = testInfo.outputPath(`${name}.png`);
  await page.screenshot({ path: file });
  await testInfo.attach(name, { path: file, contentType: 'image/png' });
}

function statusItem(page: IJupyterLabPageFixture): Locator {
  return page.locator('.jp-singularity-status');
}

async function runGpuCell(page: IJupyterLabPageFixture, gib = 2) {
  await page.notebook.setCell(0, 'code', gpuCell(gib));
  await page.notebook.runCell(0, true);
  // Typed with the keyboard, so no indented blocks (the editor would indent them again).
  const output = page.locator('.jp-Cell').first().locator('.jp-OutputArea-output');
  await expect(output).toHaveText('lease ok');
}

test.use({ viewport: { width: 1280, height: 800 } });

test.describe('GPU pool', () => {
  test('status bar and panel follow a kernel through a GPU cell, an offload and a restore', async ({
    page
  }, testInfo) => {
    await page.notebook.createNew('gpu-pool.ipynb');
    await page.notebook.setCell(0, 'code', 'print("warm")');
    await page.notebook.runCell(0, true);

    // The notebook's kernel is in the pool, not yet on a GPU.
    const status = statusItem(page);
    await expect(status).toBeVisible();
    await expect(status).toHaveAttribute('data-state', 'cold');
    const kernelId = await status.getAttribute('data-kernel-id');
    expect(kernelId).toBeTruthy();
    await expect(status).toHaveAttribute('aria-label', /GPU pool: .*Open the GPU pool panel/);

    // A GPU cell: the kernel becomes resident on GPU 0.
    await runGpuCell(page);
    await expect(status).toHaveAttribute('data-state', 'resident');
    await expect(status).toContainText('GPU 0 · resident · 2 GiB');
    await shot(page, testInfo, '01-status-resident');

    // The status item opens the panel, which shows the kernel's bar on its device.
    await status.click();
    const panel = page.locator('#jp-singularity-pool');
    await expect(panel).toBeVisible();
    const segment = panel.locator(
      `.jp-singularity-device[data-device="0"] .jp-singularity-segment[data-kernel-id="${kernelId}"]`
    );
    await expect(segment).toHaveAttribute('data-state', 'resident');
    const width = await segment.evaluate(el => (el as HTMLElement).style.width);
    expect(parseFloat(width)).toBeCloseTo(12.5, 1); // 2 of 16 GiB
    const row = panel.locator(`li.jp-singularity-kernel[data-kernel-id="${kernelId}"]`);
    await expect(row).toContainText('gpu-pool.ipynb');
    await expect(row).toContainText('resident');
    await expect(panel.locator('.jp-singularity-gauge-hours')).toContainText('of 8.00 h');
    await shot(page, testInfo, '02-panel-resident');

    // Offload from the panel: both places say offloaded, and the bar leaves the device.
    await row.getByRole('button', { name: /^Offload / }).click();
    await expect(status).toHaveAttribute('data-state', 'offloaded');
    await expect(status).toContainText('offloaded');
    const offRow = panel.locator(
      `.jp-singularity-offdevice li.jp-singularity-kernel[data-kernel-id="${kernelId}"]`
    );
    await expect(offRow).toHaveAttribute('data-state', 'offloaded');
    await expect(segment).toHaveCount(0);
    await expect(panel.locator('.jp-singularity-activity li[data-kind="offload"]')).toHaveCount(1);
    await expect(offRow.getByRole('button', { name: /^Restore / })).toBeVisible();
    await shot(page, testInfo, '03-offloaded');

    // The next GPU cell brings the kernel back onto the GPU.
    await runGpuCell(page);
    await expect(status).toHaveAttribute('data-state', 'resident');
    await expect(status).toContainText('GPU 0 · resident');
    await expect(segment).toHaveAttribute('data-state', 'resident');
    await expect(row).toContainText('resident');

    // Pin it from the panel.
    await row.getByRole('button', { name: /^Pin / }).click();
    await expect(row.getByRole('button', { name: /^Unpin / })).toBeVisible();
    await expect(status).toContainText('pinned');
    await shot(page, testInfo, '04-restored-pinned');

    // A second notebook's kernel time-shares GPU 0: two bars on one device.
    await page.notebook.createNew('second.ipynb');
    await runGpuCell(page, 6);
    await expect(status).toContainText('GPU 0 · resident · 6 GiB');
    await expect(panel.locator('.jp-singularity-device[data-device="0"] .jp-singularity-segment')).toHaveCount(2);
    await expect(panel.locator('.jp-singularity-device[data-device="0"]')).toContainText('8 GiB / 16 GiB');

    // The README's screenshot: panel and status bar.
    fs.mkdirSync(path.dirname(DOCS_IMAGE), { recursive: true });
    await page.screenshot({ path: DOCS_IMAGE });

    // Dark theme: same widgets, theme variables only.
    await page.theme.setDarkTheme();
    await expect(status).toContainText('resident');
    await shot(page, testInfo, '05-dark-theme');
    await page.theme.setLightTheme();
  });

  test('a refused action shows the server\'s message', async ({ page }, testInfo) => {
    await page.sidebar.openTab('jp-singularity-pool');
    const panel = page.locator('#jp-singularity-pool');
    await expect(panel.locator('.jp-singularity-device[data-device="0"]')).toBeVisible();
    await panel.locator('summary', { hasText: 'Quotas (admin)' }).click();
    const editor = panel.locator('#jp-singularity-quota-json');
    await expect(editor).toHaveValue(/gpu_seconds_per_day/);

    await editor.fill('{"default": {"gpu_memroy": "8GiB"}}');
    await panel.getByRole('button', { name: 'Save quotas' }).click();
    const alert = panel.locator('.jp-singularity-quota-editor [role="alert"]');
    await expect(alert).toContainText("unknown resource 'gpu_memroy'");
    await shot(page, testInfo, '06-refused');

    await editor.fill('{"default": {"gpu_memory": "8GiB", "gpu_hours_per_day": 8}}');
    await panel.getByRole('button', { name: 'Save quotas' }).click();
    await expect(panel.locator('.jp-singularity-quota-editor [role="status"]')).toContainText(
      'Quotas saved'
    );
    await expect(panel.locator('.jp-singularity-gauge-memory')).toContainText('of 8 GiB');
  });
});
