/**
 * The Binder demos (`binder/demo-*.ipynb`), run as their text tells a visitor to run them, on the
 * Binder setup: a server started through `binder/start` (one simulated 512 MiB GPU).
 *
 * The trainer's model (256 MiB of weights, gradients and Adam state) and the explorer's embeddings
 * (256 MiB) do not fit on the GPU together, so each switch between the notebooks offloads the idle
 * kernel and restores the other one; the cells' results show that nothing was lost.
 */

import { expect, IJupyterLabPageFixture, test } from '@jupyterlab/galata';
import type { Locator, TestInfo } from '@playwright/test';
import * as path from 'path';

const BINDER = path.resolve(__dirname, '..', '..', '..', 'binder');
const TRAINER = 'demo-a-trainer.ipynb';
const EXPLORER = 'demo-b-explorer.ipynb';

async function shot(page: IJupyterLabPageFixture, testInfo: TestInfo, name: string) {
  const file = testInfo.outputPath(`${name}.png`);
  await page.screenshot({ path: file });
  await testInfo.attach(name, { path: file, contentType: 'image/png' });
}

/** Runs the active notebook's cells `from`..`to` (inclusive), markdown cells included. */
async function runCells(page: IJupyterLabPageFixture, from: number, to: number) {
  for (let i = from; i <= to; i++) {
    await page.notebook.runCell(i);
  }
}

async function output(page: IJupyterLabPageFixture, index: number): Promise<Locator> {
  const locator = await page.notebook.getCellOutputLocator(index);
  expect(locator, `cell ${index} has an output`).not.toBeNull();
  return locator as Locator;
}

test.use({ viewport: { width: 1280, height: 900 } });

test('the Binder demos take turns on one simulated GPU', async ({ page, tmpPath }, testInfo) => {
  for (const name of [TRAINER, EXPLORER]) {
    await page.contents.uploadFile(path.join(BINDER, name), `${tmpPath}/${name}`);
  }
  // The status bar item (the widget's HTML in a notebook has a class of the same name).
  const status = page.locator('#jp-main-statusbar .jp-singularity-status');

  // The trainer, down to its widget: import torch, train, %singularity.
  await page.notebook.openByPath(`${tmpPath}/${TRAINER}`);
  await page.notebook.activate(TRAINER);
  await runCells(page, 0, 6);
  await expect(await output(page, 2)).toContainText('torch 2.');
  await expect(await output(page, 4)).toContainText(/loss after 20 steps: [\d.]+/);
  await expect(status).toContainText('GPU 0 · resident · 256 MiB');
  const widget = (await output(page, 6)).locator('.widget-html').first();
  await expect(widget).toContainText('GPU pool');
  await expect(widget).toContainText('resident');
  await shot(page, testInfo, 'binder-01-trainer-resident');

  // The explorer, down to its status: its first import of torch evicts the idle trainer.
  await page.notebook.openByPath(`${tmpPath}/${EXPLORER}`);
  await page.notebook.activate(EXPLORER);
  await runCells(page, 0, 6);
  await expect(await output(page, 2)).toContainText('embeddings: 256 MiB');
  await expect(await output(page, 4)).toContainText('nearest rows: [42,');
  await expect(await output(page, 6)).toContainText('resident (GPU 0)');
  await expect(status).toContainText('GPU 0 · resident · 256 MiB');
  await status.click();
  const panel = page.locator('#jp-singularity-pool');
  const trainerRow = panel.locator('.jp-singularity-offdevice li.jp-singularity-kernel', {
    hasText: TRAINER
  });
  await expect(trainerRow).toHaveAttribute('data-state', 'offloaded');
  await expect(trainerRow).toContainText('offloaded · 256 MiB');
  await shot(page, testInfo, 'binder-02-explorer-evicts-trainer');

  // Back to the trainer: its widget, updated while the kernel was idle, says offloaded. Its next
  // cell restores the model first and trains on.
  await page.notebook.activate(TRAINER);
  await expect(status).toContainText('offloaded · 256 MiB');
  await expect(widget).toContainText('offloaded');
  await runCells(page, 7, 12);
  await expect(await output(page, 8)).toContainText(/loss after 20 more steps: [\d.]+/);
  await expect(status).toContainText('GPU 0 · resident · 256 MiB');
  const log = await output(page, 10);
  await expect(log).toContainText(/restored 256\.0 MiB in [\d.]+ s \([\d.]+ GB\/s\)/);
  await expect(log).toContainText(/offloaded 256\.0 MiB to host in [\d.]+ s/);
  await expect(log).toContainText('restoring → running');
  await expect(await output(page, 12)).toContainText('GPU 0  Simulated GPU  512.0 MiB');
  await expect(widget).toContainText('resident');
  await shot(page, testInfo, 'binder-03-trainer-restored');

  // The explorer again: restored, it finds the same rows.
  await page.notebook.activate(EXPLORER);
  await expect(status).toContainText('offloaded · 256 MiB');
  await runCells(page, 7, 9);
  await expect(await output(page, 8)).toContainText('(same)');
  await expect(await output(page, 9)).toContainText(/restored 256\.0 MiB/);
  await expect(status).toContainText('GPU 0 · resident · 256 MiB');
  await expect(trainerRow).toHaveAttribute('data-state', 'offloaded');
  await shot(page, testInfo, 'binder-04-explorer-restored');
});
