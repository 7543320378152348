/**
 * Playwright configuration of the JupyterHub browser test (`hub-panel.spec.ts`): no web server of
 * its own. tests/test_hub_node.py starts the hub, the node broker and the users' servers, then runs
 * this with HUB_URL, HUB_USER, HUB_PASSWORD and OTHER_USER in the environment.
 */
const base = require('./playwright.config.js');

module.exports = {
  ...base,
  webServer: undefined,
  reporter: [['list']],
  use: { ...base.use, baseURL: process.env.HUB_URL },
  projects: [{ name: 'hub', testMatch: 'hub-panel.spec.ts', use: { browserName: 'chromium' } }]
};
