/**
 * Playwright configuration: Galata's defaults, Debian's Chromium (no browser download), and two
 * JupyterLab servers started by `webServer`: the tests' own (one simulated 2 GiB GPU) for
 * `gpu-pool.spec.ts` and `gpu-timeline.spec.ts`, and the Binder setup (`binder/start`: one
 * simulated 512 MiB GPU) for `binder-demos.spec.ts`.
 */
const baseConfig = require('@jupyterlab/galata/lib/playwright-config');

const port = process.env.SINGULARITY_UI_PORT || '18888';
const binderPort = String(Number(port) + 1);
const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';

module.exports = {
  ...baseConfig,
  timeout: 120 * 1000,
  expect: { timeout: 20 * 1000 },
  retries: 0,
  workers: 1,
  outputDir: 'test-results',
  reporter: [['list'], ['html', { open: 'never', outputFolder: 'playwright-report' }]],
  use: {
    ...baseConfig.use,
    baseURL: `http://localhost:${port}`,
    // No ffmpeg without Playwright's own browser download: screenshots, not videos.
    video: 'off',
    trace: 'retain-on-failure',
    screenshot: 'only-on-failure',
    launchOptions: {
      executablePath,
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--no-first-run',
        '--disable-dev-shm-usage'
      ]
    }
  },
  projects: [
    {
      name: 'chromium',
      testMatch: ['gpu-pool.spec.ts', 'gpu-timeline.spec.ts'],
      use: { browserName: 'chromium' }
    },
    {
      name: 'binder',
      testMatch: 'binder-demos.spec.ts',
      use: { browserName: 'chromium', baseURL: `http://localhost:${binderPort}` }
    }
  ],
  webServer: [
    {
      command: 'jupyter lab --config jupyter_server_test_config.py',
      url: `http://localhost:${port}/lab`,
      timeout: 120 * 1000,
      reuseExistingServer: !process.env.CI,
      stdout: 'ignore',
      stderr: 'pipe'
    },
    {
      // As Binder starts it: binder/start adds the devices (its command line wins over the file).
      command: `../../binder/start jupyter lab --config jupyter_server_test_config.py --port=${binderPort}`,
      url: `http://localhost:${binderPort}/lab`,
      timeout: 120 * 1000,
      reuseExistingServer: !process.env.CI,
      stdout: 'ignore',
      stderr: 'pipe'
    }
  ]
};
