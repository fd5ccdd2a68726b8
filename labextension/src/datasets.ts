import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { ApiError, LomasApi } from './api';
import { button, el, keptOpen } from './dom';
import {
  Draft,
  MetadataDoc,
  ReviewNote,
  UploadState,
  categoriesText,
  chunkRanges,
  datasetNameOf,
  describeColumn,
  editColumn,
  formProblems,
  formatOf,
  formatSize,
  fromYaml,
  progressOf,
  toYaml
} from './metadata';

/** A file the admin chose: from the Jupyter file browser, or from their own machine. */
export interface SourceFile {
  name: string;
  size: number;
  read(start: number, end: number): Promise<Uint8Array>;
}

/** The file selected in JupyterLab's file browser, or null when none is. */
export type PickFromBrowser = () => Promise<SourceFile | null>;

export interface DatasetRow {
  name: string;
  description: string;
  version: number;
  metadata: MetadataDoc;
  created_at: string;
}

interface Upload extends UploadState {
  upload: string;
  chunk_bytes: number;
}

type Say = (message: string, ok?: boolean) => void;

const YAML_TEMPLATE =
  'description: ""\nprivacy_unit: 1     # the most rows one person can have\nmax_rows: 1000      # public bound on the row count\n' +
  'columns:\n  # every column of the file, for example:\n  # age: {type: int, nullable: false, bounds: [0, 120]}\n' +
  '  # sex: {type: string, categories: [female, male]}\n';

/** A file from the user's own machine, read a chunk at a time (never all of it in memory). */
export function localFile(file: File): SourceFile {
  return {
    name: file.name,
    size: file.size,
    read: async (start, end) => new Uint8Array(await file.slice(start, end).arrayBuffer())
  };
}

/**
 * A file of this Jupyter server (the file browser's), read a chunk at a time with HTTP ranges from its /files/
 * route; a contents manager that ignores ranges sends the whole file once, which is then kept and sliced.
 */
export function jupyterFile(path: string, name: string, size: number): SourceFile {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'files', URLExt.encodeParts(path));
  let whole: Uint8Array | null = null;
  return {
    name,
    size,
    read: async (start, end) => {
      if (!whole) {
        const init = { headers: { Range: `bytes=${start}-${end - 1}` } };
        const response = await ServerConnection.makeRequest(url, init, settings);
        if (!response.ok) {
          throw new ApiError(`${name} could not be read from this Jupyter server (HTTP ${response.status})`);
        }
        const bytes = new Uint8Array(await response.arrayBuffer());
        if (response.status === 206) {
          return bytes;
        }
        whole = bytes;
      }
      return whole.subarray(start, end);
    }
  };
}

/**
 * The admin's Datasets part: every dataset's public metadata, and registering a new one. The file is uploaded in
 * chunks, a draft of its metadata may be proposed from the data, and nothing is imported until the admin has
 * reviewed the metadata (in the form or as YAML) and said so. The registration form lives across the admin
 * view's reloads, so a half-done registration is never lost.
 */
export class DatasetsPart {
  readonly form = el('fieldset', { class: 'lomas-sb-form lomas-sb-register' });
  private source = el('p', { class: 'lomas-sb-who', 'aria-live': 'polite' }, 'No file chosen.');
  private bar = el('progress', { 'aria-label': 'Upload and import progress', max: '1', value: '0', hidden: '' });
  private barText = el('p', { class: 'lomas-sb-who lomas-sb-progress', 'aria-live': 'polite' });
  private name = el('input', { 'aria-label': 'Dataset name', class: 'lomas-sb-input', placeholder: 'dataset name' });
  private description = el('textarea', {
    'aria-label': 'Dataset description (public)',
    class: 'lomas-sb-input',
    rows: '2',
    placeholder: 'description (public)'
  });
  private editor = el('div', { class: 'lomas-sb-editor' });
  private notes = el('div', { class: 'lomas-sb-review' });
  private reviewed = el('input', { type: 'checkbox', 'aria-describedby': 'lomas-sb-review-help' });
  private modeButton: HTMLButtonElement;
  private yamlText: HTMLTextAreaElement | null = null;
  /** why Import did nothing, beside the button (the panel's message line may be scrolled out of sight) */
  private importStatus = el('p', { class: 'lomas-sb-who lomas-sb-import-status', role: 'status' });
  private upload: Upload | null = null;
  private doc: MetadataDoc | null = null;
  private review: ReviewNote[] = [];
  private busy = false;
  /** datasets whose metadata is open, kept across the admin view's reloads */
  private openDatasets = new Set<string>();

  constructor(
    private api: LomasApi,
    private say: Say,
    private pickFromBrowser: PickFromBrowser | null,
    private onImported: () => Promise<void>
  ) {
    const chooser = el('input', {
      type: 'file',
      accept: '.csv,.parquet',
      'aria-label': 'Upload a CSV or Parquet file',
      class: 'lomas-sb-input'
    });
    chooser.addEventListener('change', () => {
      const file = chooser.files?.[0];
      chooser.value = '';
      if (file) {
        void this.useFile(localFile(file));
      }
    });
    const actions = el('div');
    if (pickFromBrowser) {
      actions.append(
        button('Use the file browser’s selection', 'Use the CSV or Parquet file selected in the file browser', () =>
          void this.fromBrowser()
        )
      );
    }
    this.modeButton = button('Edit as YAML', 'Switch the metadata editor between the form and YAML', () =>
      this.toggleMode()
    );
    const reviewLabel = el('label', { class: 'lomas-sb-check' });
    reviewLabel.append(this.reviewed, ' I reviewed this metadata: every bound and category is public knowledge');
    this.form.append(
      el('legend', {}, 'Register a dataset'),
      actions,
      chooser,
      this.source,
      this.bar,
      this.barText,
      this.name,
      this.description,
      button('Propose metadata from the data', 'Propose a draft of the metadata from the uploaded data', () =>
        void this.propose()
      ),
      this.modeButton,
      this.editor,
      this.notes,
      reviewLabel,
      el(
        'p',
        { class: 'lomas-sb-who', id: 'lomas-sb-review-help' },
        'Metadata is public: analysts see it. Nothing is saved until you import.'
      ),
      button('Import', 'Import the dataset with this metadata', () => void this.importNow()),
      this.importStatus
    );
    this.renderEditor();
  }

  /** The list of datasets with their public metadata, opened one at a time. */
  list(datasets: DatasetRow[]): HTMLElement {
    const box = el('div', { class: 'lomas-sb-datasets' });
    for (const d of datasets) {
      const item = keptOpen(el('details', { class: 'lomas-sb-dataset', 'data-dataset': d.name }), this.openDatasets, d.name);
      const columns = Object.entries(d.metadata.columns ?? {});
      item.append(el('summary', {}, `${d.name} v${d.version}: ${columns.length} columns`));
      item.append(el('p', { class: 'lomas-sb-who' }, d.description || '(no description)'));
      item.append(
        el(
          'p',
          { class: 'lomas-sb-who' },
          `privacy unit ${d.metadata.privacy_unit} row(s) per person; at most ${d.metadata.max_rows} rows; ` +
            `version ${d.version} of ${d.created_at.slice(0, 10)}`
        )
      );
      const table = el('table', { class: 'lomas-sb-table' });
      for (const [name, spec] of columns) {
        const row = el('tr');
        row.append(el('th', { scope: 'row' }, name), el('td', {}, describeColumn(spec)));
        table.append(row);
      }
      item.append(table);
      box.append(item);
    }
    return box;
  }

  /** Start a registration from a file (also the file browser's context menu command). */
  async useFile(file: SourceFile): Promise<void> {
    if (this.busy) {
      this.say('an upload or import is still running');
      return;
    }
    const format = formatOf(file.name);
    if (!format) {
      this.say(`${file.name} is not a .csv or .parquet file`);
      return;
    }
    this.busy = true;
    try {
      await this.discard();
      this.source.textContent = `${file.name} (${formatSize(file.size)}): uploading…`;
      if (!this.name.value) {
        this.name.value = datasetNameOf(file.name);
      }
      const upload = await this.api.call<Upload>('POST', 'admin/uploads', { size: file.size, format });
      this.show(upload, false);
      for (const [start, end] of chunkRanges(file.size, upload.chunk_bytes)) {
        const state = await this.api.call<Upload>(
          'PUT',
          `admin/uploads/${upload.upload}?offset=${start}`,
          await file.read(start, end)
        );
        this.show(state, false);
      }
      this.upload = upload;
      this.source.textContent = `${file.name} (${formatSize(file.size)}), uploaded; not imported yet.`;
      this.say(`uploaded ${file.name}: propose metadata from it, or write it`, true);
    } catch (err) {
      this.source.textContent = `${file.name}: the upload failed.`;
      this.say(err instanceof ApiError ? err.message : String(err));
    } finally {
      this.busy = false;
    }
  }

  private async fromBrowser(): Promise<void> {
    try {
      const file = await this.pickFromBrowser?.();
      if (!file) {
        this.say('select a .csv or .parquet file in the file browser first');
        return;
      }
      await this.useFile(file);
    } catch (err) {
      this.say(err instanceof ApiError ? err.message : String(err));
    }
  }

  private async discard(): Promise<void> {
    if (this.upload) {
      const id = this.upload.upload;
      this.upload = null;
      await this.api.call('DELETE', `admin/uploads/${id}`).catch(() => undefined);
    }
  }

  private show(state: UploadState, importing: boolean): void {
    const { value, text } = progressOf(state, importing);
    this.bar.hidden = false;
    this.bar.value = value;
    this.barText.textContent = text;
  }

  private async propose(): Promise<void> {
    if (!this.upload) {
      this.say('choose a file first: the draft is proposed from its data');
      return;
    }
    try {
      const draft = await this.api.call<Draft>('POST', 'admin/datasets/draft', { upload: this.upload.upload });
      this.doc = draft.metadata;
      this.review = draft.review;
      this.reviewed.checked = false;
      this.yamlText = null;
      this.renderEditor();
      this.say(`proposed metadata for ${Object.keys(draft.metadata.columns).length} columns: review it`, true);
    } catch (err) {
      this.say(err instanceof ApiError ? err.message : String(err));
    }
  }

  /** The metadata as edited now, from the form or the YAML; throws a one-line reason. */
  private current(): MetadataDoc {
    if (this.yamlText) {
      return fromYaml(this.yamlText.value);
    }
    if (!this.doc) {
      throw new Error('give the metadata: propose a draft from the data, or write it as YAML');
    }
    return this.doc;
  }

  private toggleMode(): void {
    try {
      if (this.yamlText) {
        this.doc = fromYaml(this.yamlText.value);
        this.yamlText = null;
        if (this.doc.description) {
          this.description.value = this.doc.description; // the YAML's description is the form's too
        }
      } else {
        if (this.doc && this.description.value.trim()) {
          this.doc = { ...this.doc, description: this.description.value.trim() }; // typed in the form: kept
        }
        this.yamlText = el('textarea', {
          class: 'lomas-sb-input lomas-sb-yaml',
          rows: '14',
          spellcheck: 'false',
          'aria-label': 'Metadata as YAML'
        });
        this.yamlText.value = this.doc ? toYaml(this.doc, this.review) : YAML_TEMPLATE;
      }
      this.renderEditor();
    } catch (err) {
      this.say((err as Error).message);
    }
  }

  private renderEditor(): void {
    this.modeButton.textContent = this.yamlText ? 'Edit as form' : 'Edit as YAML';
    this.notes.replaceChildren();
    if (this.review.length) {
      const list = el('ul');
      this.review.forEach(n =>
        list.append(el('li', {}, `${n.column ? `${n.column}: ` : ''}${n.field}: ${n.note}`))
      );
      this.notes.append(el('h4', {}, 'Taken from the data: review before importing'), list);
    }
    if (this.yamlText) {
      this.editor.replaceChildren(this.yamlText);
      return;
    }
    if (!this.doc) {
      this.editor.replaceChildren(
        el('p', { class: 'lomas-sb-who' }, 'No metadata yet: propose a draft from the data, or edit as YAML.')
      );
      return;
    }
    const doc = this.doc;
    const flagged = new Set(this.review.map(n => `${n.column ?? ''}.${n.field}`));
    const top = el('div', { class: 'lomas-sb-form' });
    for (const key of ['privacy_unit', 'max_rows'] as const) {
      const field = this.field(`${key.replace('_', ' ')}`, String(doc[key]), flagged.has(`.${key}`), value => {
        doc[key] = value.trim() === '' ? NaN : Number(value);
      });
      field.querySelector('input')?.setAttribute('type', 'number');
      top.append(field);
    }
    this.editor.replaceChildren(top);
    for (const [name, spec] of Object.entries(doc.columns)) {
      const box = el('fieldset', { class: 'lomas-sb-form lomas-sb-column', 'data-column': name });
      box.append(el('legend', {}, name));
      const set = (field: Parameters<typeof editColumn>[2], value: string | boolean): void => {
        try {
          doc.columns[name] = editColumn(name, doc.columns[name], field, value);
        } catch (err) {
          this.say((err as Error).message);
        }
      };
      const type = el('select', { 'aria-label': `Type of ${name}`, class: 'lomas-sb-input' });
      for (const option of ['int', 'float', 'string', 'bool']) {
        const item = el('option', { value: option }, option);
        item.selected = option === spec.type;
        type.append(item);
      }
      type.addEventListener('change', () => set('type', type.value));
      const nullable = el('input', { type: 'checkbox', 'aria-label': `${name} may be missing` });
      nullable.checked = spec.nullable !== false;
      nullable.addEventListener('change', () => set('nullable', nullable.checked));
      const nullLabel = el('label', { class: 'lomas-sb-check' });
      nullLabel.append(nullable, ' may be missing');
      box.append(type, nullLabel);
      if (spec.type === 'int' || spec.type === 'float') {
        const [lo, hi] = spec.bounds ?? [NaN, NaN];
        const review = flagged.has(`${name}.bounds`);
        box.append(
          this.field(`Lower bound of ${name}`, Number.isNaN(lo) ? '' : String(lo), review, v => set('lower', v)),
          this.field(`Upper bound of ${name}`, Number.isNaN(hi) ? '' : String(hi), review, v => set('upper', v))
        );
      }
      if (spec.type !== 'float') {
        box.append(this.field(`Categories of ${name}`, categoriesText(spec.categories), flagged.has(`${name}.categories`), v => set('categories', v)));
      }
      box.append(this.field(`Description of ${name}`, spec.description ?? '', false, v => set('description', v)));
      this.editor.append(box);
    }
  }

  /** A labelled input; one the draft took from the data is marked for review (in its name, not only colour). */
  private field(label: string, value: string, review: boolean, onChange: (value: string) => void): HTMLElement {
    const wrap = el('label', { class: review ? 'lomas-sb-field lomas-sb-flagged' : 'lomas-sb-field' });
    const node = el('input', {
      class: 'lomas-sb-input',
      'aria-label': review ? `${label} (from the data: review)` : label
    });
    node.value = value;
    node.addEventListener('change', () => onChange(node.value));
    wrap.append(`${label}${review ? ' (review)' : ''}`, node);
    return wrap;
  }

  /** A reason Import did nothing: in the message line and beside the button, scrolled into view. */
  private refuse(message: string): void {
    this.importStatus.textContent = message;
    this.importStatus.scrollIntoView?.({ block: 'nearest' });
    this.say(message);
  }

  private async importNow(): Promise<void> {
    if (this.busy) {
      this.say('an upload or import is still running');
      return;
    }
    if (!this.upload) {
      this.say('choose a CSV or Parquet file first');
      return;
    }
    let metadata: MetadataDoc;
    try {
      metadata = this.current();
    } catch (err) {
      this.say((err as Error).message);
      return;
    }
    const problems = formProblems(metadata);
    if (problems.length) {
      this.refuse(problems[0]);
      return;
    }
    if (!this.reviewed.checked) {
      this.refuse('review the metadata and tick “I reviewed this metadata” first: it becomes public');
      this.reviewed.focus();
      return;
    }
    this.importStatus.textContent = '';
    const upload = this.upload;
    const body: Record<string, unknown> = { name: this.name.value.trim(), metadata, upload: upload.upload };
    if (this.description.value.trim()) {
      body.description = this.description.value.trim();
    }
    this.busy = true;
    let settled = false;
    const poll = async (): Promise<void> => {
      while (!settled) {
        try {
          const state = await this.api.call<Upload>('GET', `admin/uploads/${upload.upload}`);
          if (!settled) {
            this.show(state, true);
          }
        } catch {
          return; // discarded: the import finished
        }
        await new Promise(resolve => setTimeout(resolve, 200));
      }
    };
    const polling = poll();
    try {
      const out = await this.api.call<{ name: string; version: number; warnings: string[] }>(
        'POST',
        'admin/datasets',
        body
      );
      settled = true;
      this.bar.value = 1;
      this.barText.textContent = `Imported ${out.name} version ${out.version}`;
      this.say(
        `imported ${out.name} version ${out.version}` + (out.warnings.length ? `; note: ${out.warnings.join('; ')}` : ''),
        true
      );
      this.reset();
      await this.onImported();
    } catch (err) {
      settled = true;
      const message = err instanceof ApiError ? err.message : String(err);
      this.barText.textContent = `Import refused: ${message}`;
      this.say(message);
    } finally {
      settled = true;
      this.busy = false;
      await polling;
    }
  }

  private reset(): void {
    this.upload = null;
    this.doc = null;
    this.review = [];
    this.yamlText = null;
    this.reviewed.checked = false;
    this.name.value = '';
    this.description.value = '';
    this.source.textContent = 'No file chosen.';
    this.renderEditor();
  }
}

