/**
 * Logged into JupyterHub as one user, the GPU pool panel shows another user's kernel, with that
 * user's name: one pool per machine, the node broker's (see tests/test_hub_node.py, which starts the
 * hub, the broker and both users' servers, and runs this test).
 */
import { expect, test } from '@playwright/test';

const user = process.env.HUB_USER ?? '';
const other = process.env.OTHER_USER ?? '';

test('the GPU pool panel shows another user\'s kernel with their name', async ({ page }, testInfo) => {
  await page.goto('hub/login');
  await page.locator('#username_input').fill(user);
  await page.locator('#password_input').fill(process.env.HUB_PASSWORD ?? '');
  await page.locator('#login_submit').click();
  await page.goto(`user/${user}/lab`);
  await page.locator('#jp-main-statusbar').waitFor({ timeout: 60_000 });

  await page.getByRole('tab', { name: 'GPU pool' }).click();
  const panel = page.locator('#jp-singularity-pool');
  const others = panel.locator('li.jp-singularity-kernel', { hasText: other });
  await expect(others.first()).toBeVisible({ timeout: 30_000 });
  await expect(others.first()).toContainText(other);
  // Not theirs: no buttons for it (the user is no admin), and its notebook path is not shown.
  await expect(others.first().getByRole('button')).toHaveCount(0);
  const file = testInfo.outputPath('hub-panel.png');
  await page.screenshot({ path: file });
  await testInfo.attach('hub-panel', { path: file, contentType: 'image/png' });
});
