import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { IDefaultFileBrowser } from '@jupyterlab/filebrowser';
import { INotebookTracker, NotebookActions } from '@jupyterlab/notebook';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { LabIcon } from '@jupyterlab/ui-components';

import { LomasApi } from './api';
import { SourceFile, jupyterFile } from './datasets';
import { base64Bytes, formatOf } from './metadata';
import { LomasPanel } from './panel';

const PLUGIN_ID = 'lomas-jupyter:plugin';
const REGISTER_COMMAND = 'lomas-jupyter:register-file';

const icon = new LabIcon({
  name: 'lomas-jupyter:icon',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><g class="jp-icon3" fill="#616161">' +
    '<path d="M12 2 4 5v6c0 5 3.4 9.7 8 11 4.6-1.3 8-6 8-11V5l-8-3zm0 4a2 2 0 1 1 0 4 2 2 0 0 1 0-4zm-4 ' +
    '9c.5-2 2-3 4-3s3.5 1 4 3H8z"/></g></svg>'
});

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'The lomas DP service in a sidebar: budgets, releases, and a ready %%dpquery cell',
  autoStart: true,
  requires: [ILabShell],
  optional: [ISettingRegistry, INotebookTracker, IDefaultFileBrowser],
  activate: async (
    app: JupyterFrontEnd,
    shell: ILabShell,
    registry: ISettingRegistry | null,
    notebooks: INotebookTracker | null,
    browser: IDefaultFileBrowser | null
  ) => {
    const api = new LomasApi('', '');
    const insertCell = (source: string): boolean => {
      const current = notebooks?.currentWidget;
      if (!current) {
        return false;
      }
      const notebook = current.content;
      NotebookActions.insertBelow(notebook);
      notebook.activeCell?.model.sharedModel.setSource(source);
      shell.activateById(current.id);
      return true;
    };
    /** The file selected in the file browser, read through this Jupyter server's contents API. */
    const selectedFile = async (): Promise<SourceFile | null> => {
      const item = browser ? Array.from(browser.selectedItems()).find(i => i.type !== 'directory') : undefined;
      if (!item) {
        return null;
      }
      const model = await app.serviceManager.contents.get(item.path, { content: false });
      if (typeof model.size === 'number') {
        return jupyterFile(item.path, item.name, model.size);
      }
      const full = await app.serviceManager.contents.get(item.path, { content: true, format: 'base64' });
      const bytes = base64Bytes(String(full.content ?? ''));
      return { name: item.name, size: bytes.length, read: async (start, end) => bytes.subarray(start, end) };
    };
    const panel = new LomasPanel(api, insertCell, browser ? selectedFile : null);
    panel.title.icon = icon;
    shell.add(panel, 'left', { rank: 950 });
    app.commands.addCommand(REGISTER_COMMAND, {
      label: 'Register as a DP dataset…',
      caption: 'Upload this CSV or Parquet file to the DP service and describe its public metadata',
      isVisible: () => {
        const item = browser ? Array.from(browser.selectedItems())[0] : undefined;
        return Boolean(item && formatOf(item.name));
      },
      execute: async () => {
        shell.activateById(panel.id);
        const file = await selectedFile();
        if (file) {
          await panel.register(file);
        }
      }
    });
    app.contextMenu.addItem({ command: REGISTER_COMMAND, selector: '.jp-DirListing-item[data-isdir="false"]', rank: 60 });
    if (registry) {
      try {
        const settings = await registry.load(PLUGIN_ID);
        const apply = (): void => {
          api.configure(settings.get('serviceUrl').composite as string, settings.get('token').composite as string);
          panel.setRefreshSeconds(settings.get('refreshSeconds').composite as number);
          void panel.refresh();
        };
        apply();
        settings.changed.connect(apply);
      } catch (err) {
        console.warn('lomas-jupyter: settings not loaded, using the embedded service', err);
      }
    }
  }
};

export default plugin;
