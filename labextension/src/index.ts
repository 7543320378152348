/**
 * jupyter-singularity's JupyterLab extension: a status bar item for the active notebook's kernel
 * and a "GPU pool" sidebar panel, both fed by one {@link PoolModel} that listens to the server's
 * events (`/api/events/subscribe`) and refreshes from the REST API.
 */

import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { IStatusBar } from '@jupyterlab/statusbar';

import { PoolAPI } from './api';
import { HistoryModel } from './history';
import { PoolModel } from './model';
import { PANEL_ID, PoolPanel } from './panel';
import { PoolStatusItem } from './statusbar';
import type { IServerEvent } from './types';

export { HistoryModel, PoolAPI, PoolModel, PoolPanel, PoolStatusItem };
export * from './charts';
export * from './format';
export * from './types';

const PLUGIN_ID = 'jupyter-singularity:plugin';

namespace CommandIDs {
  export const openPool = 'jupyter-singularity:open-pool';
  export const refresh = 'jupyter-singularity:refresh';
}

interface ISettings {
  refreshInterval: number;
  panelArea: 'left' | 'right';
  showStatusItem: boolean;
}

const DEFAULTS: ISettings = { refreshInterval: 30, panelArea: 'left', showStatusItem: true };

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'GPU pool status bar item and sidebar panel for jupyter-singularity.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [
    IStatusBar,
    ISettingRegistry,
    ILayoutRestorer,
    ICommandPalette,
    ILabShell,
    IRenderMimeRegistry
  ],
  activate: async (
    app: JupyterFrontEnd,
    tracker: INotebookTracker,
    statusBar: IStatusBar | null,
    settingRegistry: ISettingRegistry | null,
    restorer: ILayoutRestorer | null,
    palette: ICommandPalette | null,
    labShell: ILabShell | null,
    rendermime: IRenderMimeRegistry | null
  ) => {
    let settings: ISettings = { ...DEFAULTS };
    let loaded: ISettingRegistry.ISettings | null = null;
    if (settingRegistry) {
      try {
        loaded = await settingRegistry.load(PLUGIN_ID);
        settings = { ...DEFAULTS, ...(loaded.composite as unknown as Partial<ISettings>) };
      } catch (reason) {
        console.warn('jupyter-singularity: cannot load settings', reason);
      }
    }

    const sessions = app.serviceManager.sessions;
    const notebookPath = (kernelId: string): string | null => {
      for (const session of sessions.running()) {
        if (session.kernel?.id === kernelId) {
          return session.path;
        }
      }
      return null;
    };
    const api = new PoolAPI(app.serviceManager.serverSettings);
    const model = new PoolModel(api, { notebookPath });
    const history = new HistoryModel(api);
    sessions.runningChanged.connect(() => model.touch());
    const activeKernelId = () =>
      tracker.currentWidget?.sessionContext.session?.kernel?.id ?? null;

    const panel = new PoolPanel({ model, activeKernelId, history, rendermime });
    app.shell.add(panel, settings.panelArea, { rank: 650, type: 'GPU pool' });
    restorer?.add(panel, 'jupyter-singularity:pool');
    const followActive = () => panel.refreshActive();
    tracker.currentChanged.connect(followActive);
    tracker.activeCellChanged.connect(followActive);

    app.commands.addCommand(CommandIDs.openPool, {
      label: 'Show the GPU pool',
      caption: 'Open the GPU pool panel: devices, kernels, queue, quota',
      icon: panel.title.icon,
      execute: () => app.shell.activateById(PANEL_ID)
    });
    app.commands.addCommand(CommandIDs.refresh, {
      label: 'Refresh the GPU pool',
      execute: () => model.refresh()
    });
    palette?.addItem({ command: CommandIDs.openPool, category: 'GPU pool' });
    palette?.addItem({ command: CommandIDs.refresh, category: 'GPU pool' });

    if (statusBar && settings.showStatusItem) {
      const item = new PoolStatusItem(model, tracker, () =>
        app.commands.execute(CommandIDs.openPool)
      );
      statusBar.registerStatusItem('jupyter-singularity:status', {
        item,
        align: 'left',
        rank: 4,
        isActive: () => true
      });
    }
    void labShell;

    // Live updates: the server's events, filtered to the pool's schemas, then a slow fallback.
    app.serviceManager.events.stream.connect((_, event) => {
      model.handleEvent(event as unknown as IServerEvent);
    });
    let timer: ReturnType<typeof setInterval> | null = null;
    const schedule = (seconds: number) => {
      if (timer !== null) {
        clearInterval(timer);
        timer = null;
      }
      if (seconds > 0) {
        timer = setInterval(() => {
          if (!document.hidden) {
            void model.refresh();
          }
        }, seconds * 1000);
      }
    };
    schedule(settings.refreshInterval);
    loaded?.changed.connect(() => {
      const next = { ...DEFAULTS, ...(loaded!.composite as unknown as Partial<ISettings>) };
      schedule(next.refreshInterval);
    });
    void app.restored.then(() => model.refresh());
    void model.refresh();
  }
};

export default plugin;
