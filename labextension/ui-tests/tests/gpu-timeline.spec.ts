/**
 * The GPU pool panel's pictures in a real JupyterLab and a real Chromium, on one simulated 2 GiB
 * GPU, after two notebooks took turns on it with real torch cells: turn-a makes a 1 GiB tensor,
 * turn-b a 1.5 GiB one (the pool offloads turn-a's kernel to make room), then turn-a's next cell
 * brings its tensor back (turn-b's kernel is offloaded in turn).
 *
 * The timeline (drawn by JupyterLab's own Vega-Lite renderer, as SVG) shows GPU 0's lane with the
 * leases of both kernels, ▼ offloads and ▲ restores; hovering a bar shows its notebook, user,
 * duration and bytes. "My GPU time" and the admin's GPU time by user are drawn beside it.
 */

import { expect, IJupyterLabPageFixture, test } from '@jupyterlab/galata';
import type { Locator, TestInfo } from '@playwright/test';
import * as fs from 'fs';
import * as path from 'path';

import { openNotebook, runCell } from './notebooks';

/** The guides' picture of the timeline, refreshed by each run. */
const DOCS_IMAGE = path.resolve(__dirname, '..', '..', '..', 'docs', 'images', 'timeline.png');

async function shot(target: IJupyterLabPageFixture | Locator, testInfo: TestInfo, name: string) {
  const file = testInfo.outputPath(`${name}.png`);
  await target.screenshot({ path: file });
  await testInfo.attach(name, { path: file, contentType: 'image/png' });
  return file;
}

/** The kernel id of the active notebook, as its status bar item says. */
async function activeKernel(page: IJupyterLabPageFixture): Promise<string> {
  const status = page.locator('#jp-main-statusbar .jp-singularity-status');
  await expect(status).toHaveAttribute('data-kernel-id', /.+/);
  return (await status.getAttribute('data-kernel-id')) as string;
}

// The real server says who the user is (Galata would mock every URL ending in /api/me).
test.use({ viewport: { width: 1400, height: 900 }, mockUser: false });

test('the timeline after two notebooks took turns on the GPU', async ({ page, tmpPath }, testInfo) => {
  test.setTimeout(300_000); // three torch cells with 1 and 1.5 GiB tensors, on two loaded cores
  await openNotebook(page, tmpPath, 'turn-a.ipynb');
  // Run twice: the second run finds its tensor (restored before the cell runs) and keeps it.
  const cellA = [
    'import torch',
    'x = x if "x" in globals() else torch.randn(256, 1024, 1024)  # 1 GiB',
    'print("a", x.nbytes >> 20, float(x.sum()) != 0)'
  ];
  await runCell(page, cellA, 'a 1024 True');
  const first = await activeKernel(page);
  await openNotebook(page, tmpPath, 'turn-b.ipynb');
  await runCell(
    page,
    ['import torch', 'y = torch.ones(384, 1024, 1024)  # 1.5 GiB', 'print("b ready")'],
    'b ready'
  );
  const second = await activeKernel(page);
  expect(second).not.toBe(first);
  await page.notebook.activate('turn-a.ipynb');
  await page.evaluate(async () => {
    await (window as any).galata.app.commands.execute('notebook:run-cell');
  });
  const cell = page.locator('.jp-NotebookPanel').filter({ visible: true }).locator('.jp-Cell').first();
  await expect(cell.locator('.jp-InputPrompt')).toHaveText('[2]:', { timeout: 60_000 });
  await expect(cell.locator('.jp-OutputArea-output')).toHaveText('a 1024 True');

  // The ledger has both kernels' leases on GPU 0, and the transfers between them.
  const answer = await (await page.request.get('/singularity/api/timeline')).json();
  const leased = answer.leases.filter((l: any) => [first, second].includes(l.kernel_id));
  expect(leased.map((l: any) => l.kernel_id)).toEqual([first, second, first]);
  expect(leased.every((l: any) => l.device === 0)).toBeTruthy();

  await page.sidebar.openTab('jp-singularity-pool');
  const panel = page.locator('#jp-singularity-pool');
  const timeline = panel.locator('section.jp-singularity-timeline');
  const chart = timeline.locator('.jp-singularity-timeline-chart');
  // Drawn again as the history is read again: wait for the picture with both kernels in it.
  await expect(chart).toHaveAttribute('data-restores', /^[1-9]/, { timeout: 30_000 });
  expect(Number(await chart.getAttribute('data-kernels'))).toBeGreaterThanOrEqual(2);
  expect(Number(await chart.getAttribute('data-offloads'))).toBeGreaterThanOrEqual(2);
  expect(Number(await chart.getAttribute('data-leases'))).toBeGreaterThanOrEqual(3);
  const svg = chart.locator('svg.marks');
  await expect(svg).toBeVisible();
  await expect(svg).toContainText('GPU 0');
  const bars = svg.locator('g.mark-rect path');
  await expect.poll(() => bars.count()).toBeGreaterThanOrEqual(3);
  await expect(svg.locator('g.mark-symbol path').first()).toBeAttached();

  // Hovering turn-a's widest bar shows its notebook, user, duration and bytes. The attributes
  // above change with the data; Vega redraws the SVG after them, so wait for both of its bars.
  await timeline.scrollIntoViewIfNeeded();
  const barsOf = async (notebook: string) =>
    (
      await bars.evaluateAll(paths =>
        paths.map(p => ({
          width: p.getBoundingClientRect().width,
          label: p.getAttribute('aria-label') ?? ''
        }))
      )
    )
      .map((w, index) => ({ ...w, index }))
      .filter(w => w.label.includes(notebook))
      .sort((a, b) => b.width - a.width);
  await expect.poll(async () => (await barsOf('turn-a.ipynb')).length).toBeGreaterThanOrEqual(2);
  // A refresh that lands after the hover redraws the SVG under the pointer and hides the
  // tooltip: hover the widest bar of the picture drawn then, until its tooltip shows.
  const tooltip = page.locator('#vg-tooltip-element');
  await expect(async () => {
    const mine = await barsOf('turn-a.ipynb');
    await page.mouse.move(0, 0);
    await bars.nth(mine[0].index).hover();
    await expect(tooltip).toBeVisible({ timeout: 2000 });
  }).toPass({ timeout: 30000 });
  await expect(tooltip).toContainText('turn-a.ipynb');
  const me = await (await page.request.get('/singularity/api/me')).json();
  await expect(tooltip).toContainText(me.user);
  await expect(tooltip).toContainText(/duration:?\s*[\d.]+ (s|min)/);
  await expect(tooltip).toContainText(/bytes:?\s*[\d.]+ (GiB|MiB) (peak|reserved)/);
  await shot(page, testInfo, 'timeline-hover');

  // My GPU time: a bar per day of the week; the admin's GPU time per user.
  const myTime = panel.locator('section.jp-singularity-my-gpu-time');
  await expect(myTime.locator('.jp-singularity-gpu-time-chart svg.marks')).toBeVisible();
  await expect(myTime).toContainText('limit 8.00 h a day');
  await expect(myTime.locator('g.mark-rect path')).toHaveCount(7);
  const totals = panel.locator('section.jp-singularity-totals');
  await expect(totals.locator('.jp-singularity-users-chart svg.marks')).toBeVisible();
  await expect(totals.locator('.jp-singularity-users-chart')).toHaveAttribute('data-users', /^[1-9]/);

  await page.mouse.move(0, 0);
  await expect(tooltip).toBeHidden();
  await timeline.scrollIntoViewIfNeeded();
  const file = await shot(timeline, testInfo, 'timeline');
  fs.mkdirSync(path.dirname(DOCS_IMAGE), { recursive: true });
  fs.copyFileSync(file, DOCS_IMAGE);
  await shot(page, testInfo, 'panel-with-pictures');
  await shot(myTime, testInfo, 'my-gpu-time');
  await shot(totals, testInfo, 'gpu-time-by-user');
});
