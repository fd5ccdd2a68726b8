import { Widget } from '@lumino/widgets';

import { AdminView } from './admin';
import { PickFromBrowser, SourceFile } from './datasets';
import { ApiError, LomasApi } from './api';
import { button, el, keptOpen } from './dom';
import { BudgetRequestRow, RequestForm, myRequests } from './requests';
import {
  ColumnMeta,
  DatasetInfo,
  ReleaseRecord,
  dpqueryCell,
  gauges,
  recentReleases,
  releaseTable
} from './model';

interface WhoAmI {
  username: string;
  role: string;
}

/** Insert a cell with this text into the current notebook; returns false when no notebook is open. */
export type CellInserter = (source: string) => boolean;

/** The sidebar: the analyst view (budgets as gauges, recent releases, a ready %%dpquery cell). */
export class LomasPanel extends Widget {
  private timer: number | undefined;
  private busy = false;
  private openReleases = new Set<number>();
  private admin: AdminView | null = null;
  private analyst = document.createElement('div');
  private status = el('p', { class: 'lomas-sb-status', role: 'status' });
  private badge = el('span', { class: 'lomas-sb-badge', 'aria-live': 'polite' });
  private requestForm: RequestForm;

  constructor(
    readonly api: LomasApi,
    private insertCell: CellInserter,
    private pickFromBrowser: PickFromBrowser | null = null,
    private refreshSeconds = 3
  ) {
    super();
    this.id = 'lomas-sidebar';
    this.addClass('lomas-Panel');
    this.title.caption = 'DP service: budgets and releases';
    this.node.setAttribute('role', 'region');
    this.node.setAttribute('aria-label', 'DP service');
    this.requestForm = new RequestForm(api, (message, ok) => this.say(message, ok), () => void this.refresh());
    this.node.append(this.status, this.badge, this.analyst, this.requestForm.node);
  }

  /** The count of budget requests waiting for an admin: on the sidebar's tab and at the panel's top. */
  private showPending(count: number): void {
    this.badge.textContent = count ? `${count} budget request${count === 1 ? '' : 's'} waiting` : '';
    // Keep the shell's own keys (it sets data-id on the tab through the same dataset).
    // Lumino writes each key as data-KEY verbatim, so the key is spelled the way the attribute is.
    const { 'lomas-pending': _previous, ...shellKeys } = this.title.dataset;
    this.title.dataset = count ? { ...shellKeys, 'lomas-pending': String(count) } : shellKeys;
    this.title.caption = count
      ? `DP service: ${count} budget request(s) waiting for you`
      : 'DP service: budgets and releases';
  }

  setRefreshSeconds(seconds: number): void {
    this.refreshSeconds = Math.max(seconds, 1);
    this.schedule();
  }

  protected onAfterAttach(): void {
    void this.refresh();
    this.schedule();
  }

  protected onBeforeDetach(): void {
    window.clearInterval(this.timer);
    this.timer = undefined;
  }

  private schedule(): void {
    window.clearInterval(this.timer);
    if (this.isAttached) {
      this.timer = window.setInterval(() => void this.refresh(), this.refreshSeconds * 1000);
    }
  }

  /** Re-read everything; keeps the previous view on a failure and says why in one line. */
  async refresh(): Promise<void> {
    if (this.busy) {
      return;
    }
    this.busy = true;
    try {
      const [me, datasets, archive, asked] = await Promise.all([
        this.api.call<WhoAmI>('GET', 'whoami'),
        this.api.call<DatasetInfo[]>('GET', 'datasets'),
        this.api.call<ReleaseRecord[]>('GET', 'archive?limit=10'),
        this.api.call<BudgetRequestRow[]>('GET', 'requests')
      ]);
      this.render(me, datasets, archive, asked);
      await this.refreshAdmin(me.role === 'admin');
      this.showPending(this.admin?.pending ?? 0);
    } catch (err) {
      this.showError(err instanceof ApiError ? err.message : 'the DP service answered in a way this panel cannot read');
    } finally {
      this.busy = false;
    }
  }

  /** Only admins see the admin view; it is not rebuilt while a form in it is being filled in. */
  private async refreshAdmin(isAdmin: boolean): Promise<void> {
    if (!isAdmin) {
      this.admin?.node.remove();
      this.admin = null;
      return;
    }
    if (!this.admin) {
      this.admin = new AdminView(this.api, (message, ok) => this.say(message, ok), this.pickFromBrowser);
      this.node.append(this.admin.node);
    } else if (this.admin.editing) {
      return;
    }
    await this.admin.load();
  }

  /** Register a file as a dataset (admins only): opens the Datasets part with the file uploading. */
  async register(file: SourceFile): Promise<void> {
    if (!this.admin) {
      await this.refresh();
    }
    if (!this.admin) {
      this.say('only admins register datasets');
      return;
    }
    await this.admin.register(file);
  }

  /** One line at the top: what just happened, or what went wrong. */
  say(message: string, ok = false): void {
    this.status.textContent = message;
    this.status.className = ok ? 'lomas-sb-status' : 'lomas-sb-status lomas-sb-error';
  }

  private showError(message: string): void {
    this.say(message);
  }

  private render(me: WhoAmI, datasets: DatasetInfo[], archive: ReleaseRecord[], asked: BudgetRequestRow[]): void {
    const root = el('div', { class: 'lomas-sb-content' });
    root.append(el('h2', { class: 'lomas-sb-heading' }, 'DP service'));
    root.append(el('p', { class: 'lomas-sb-who' }, `Signed in as ${me.username} (${me.role})`));

    const budgetSection = el('section', { 'aria-label': 'My budgets' });
    budgetSection.append(el('h3', {}, 'My budgets'));
    const list = el('ul', { class: 'lomas-sb-gauges' });
    for (const gauge of gauges(datasets)) {
      const item = el('li', { class: 'lomas-sb-gauge', 'data-dataset': gauge.dataset });
      item.append(el('div', { class: 'lomas-sb-gauge-name' }, gauge.dataset));
      if (gauge.description) {
        item.append(el('div', { class: 'lomas-sb-gauge-description' }, gauge.description));
      }
      const percent = Math.round(gauge.remainingShare * 100);
      const bar = el('div', {
        class: 'lomas-sb-bar',
        role: 'progressbar',
        'aria-label': `ε remaining on ${gauge.dataset}`,
        'aria-valuemin': '0',
        'aria-valuemax': '100',
        'aria-valuenow': String(percent),
        'aria-valuetext': gauge.label
      });
      const fill = el('div', { class: 'lomas-sb-bar-fill' });
      fill.style.width = `${percent}%`;
      bar.append(fill);
      item.append(bar);
      item.append(el('div', { class: 'lomas-sb-gauge-label' }, gauge.label));
      if (gauge.deltaLabel) {
        item.append(el('div', { class: 'lomas-sb-gauge-label' }, gauge.deltaLabel));
      }
      if (gauge.granted) {
        const asking = button('Ask for more ε', `Ask your instructor for more ε on ${gauge.dataset}`, () =>
          this.requestForm.open(gauge.dataset)
        );
        asking.className = 'jp-Button lomas-sb-ask';
        item.append(
          button('Insert %%dpquery cell', `Insert a %%dpquery cell for ${gauge.dataset}`, () =>
            void this.insertFor(gauge.dataset)
          ),
          asking
        );
      }
      list.append(item);
    }
    if (!datasets.length) {
      list.append(el('li', {}, 'No datasets yet.'));
    }
    budgetSection.append(list);
    root.append(budgetSection, myRequests(asked));

    const releaseSection = el('section', { 'aria-label': 'My recent releases' });
    releaseSection.append(el('h3', {}, 'My recent releases'));
    const byId = new Map(archive.map(r => [r.id, r]));
    const releases = el('ul', { class: 'lomas-sb-releases' });
    for (const row of recentReleases(archive)) {
      const item = el('li', { class: 'lomas-sb-release' });
      const details = keptOpen(el('details'), this.openReleases, row.id);
      const summary = el('summary');
      summary.append(el('span', { class: 'lomas-sb-release-sql' }, row.title));
      summary.append(el('span', { class: 'lomas-sb-release-meta' }, `${row.cost} · ${row.when}`));
      details.append(summary, this.table(byId.get(row.id)!));
      item.append(details);
      releases.append(item);
    }
    if (!archive.length) {
      releases.append(el('li', {}, 'No releases yet.'));
    }
    releaseSection.append(releases);
    root.append(releaseSection);

    this.analyst.replaceChildren(root);
  }

  private table(record: ReleaseRecord): HTMLElement {
    const { columns, rows } = releaseTable(record);
    const table = el('table', { class: 'lomas-sb-table' });
    const head = el('tr');
    columns.forEach(c => head.append(el('th', { scope: 'col' }, c)));
    table.append(el('thead'), el('tbody'));
    table.tHead!.append(head);
    for (const row of rows) {
      const tr = el('tr');
      row.forEach(v => tr.append(el('td', {}, v)));
      table.tBodies[0].append(tr);
    }
    return table;
  }

  private async insertFor(dataset: string): Promise<void> {
    try {
      const doc = await this.api.call<{ metadata: { columns: Record<string, ColumnMeta> } }>(
        'GET',
        `datasets/${encodeURIComponent(dataset)}`
      );
      if (!this.insertCell(dpqueryCell(dataset, doc.metadata.columns))) {
        this.showError('open a notebook first: the cell goes into the current notebook');
      }
    } catch (err) {
      this.showError(err instanceof ApiError ? err.message : String(err));
    }
  }
}
