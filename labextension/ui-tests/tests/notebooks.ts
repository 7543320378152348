/**
 * Notebooks in the browser tests: open a new one, run a cell and wait for what it prints.
 */

import { expect, IJupyterLabPageFixture } from '@jupyterlab/galata';

/**
 * Types `lines` into the active notebook's first cell, runs it and waits for `expected` as what
 * it printed. Typed with the keyboard, so no indented blocks (the editor would indent them again).
 * Only stdout is compared: a cell whose `import torch` waited for its lease keeps the emptied
 * wait line as a display output without a MIME type, which renders as nothing.
 */
export async function runCell(
  page: IJupyterLabPageFixture,
  lines: string[],
  expected: string | RegExp
): Promise<void> {
  await page.notebook.setCell(0, 'code', lines.join('\n'));
  await page.notebook.runCell(0, true);
  const notebook = page.locator('.jp-NotebookPanel').filter({ visible: true });
  const output = notebook
    .locator('.jp-Cell')
    .first()
    .locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stdout"]');
  await expect(output).toHaveText(expected, { timeout: 60_000 });
}

/**
 * Opens a new, empty notebook `name` (a Python 3 kernel) in the test's folder. Written first and
 * then opened, rather than created as Untitled.ipynb and renamed: a rename while the new kernel's
 * session is still being created leaves that session (and so the panel) with the old name.
 */
export async function openNotebook(page: IJupyterLabPageFixture, tmpPath: string, name: string) {
  const notebook = {
    cells: [{ cell_type: 'code', source: '', metadata: {}, outputs: [], execution_count: null }],
    metadata: {
      kernelspec: { name: 'python3', display_name: 'Python 3 (ipykernel)', language: 'python' }
    },
    nbformat: 4,
    nbformat_minor: 5
  };
  const file = `${tmpPath}/${name}`;
  await page.contents.uploadContent(JSON.stringify(notebook), 'text', file);
  // Through the command, not the file browser: the panel may hide the file browser.
  await page.evaluate(async path => {
    await (window as any).galata.app.commands.execute('docmanager:open', { path });
  }, file);
  await page.notebook.activate(name);
}
