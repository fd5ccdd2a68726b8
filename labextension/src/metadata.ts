import * as yaml from 'js-yaml';

/** Public metadata as the service reads it (see the README): everything here is shown to analysts. */
export interface ColumnSpec {
  type: 'int' | 'float' | 'string' | 'bool';
  nullable?: boolean;
  bounds?: [number, number];
  categories?: (string | number | boolean)[];
  candidates?: number[];
  description?: string;
}

export interface MetadataDoc {
  description?: string;
  privacy_unit: number;
  max_rows: number;
  columns: Record<string, ColumnSpec>;
}

/** Why a draft's field needs the data owner's eye (it was taken from the data). */
export interface ReviewNote {
  column: string | null;
  field: string;
  note: string;
}

export interface Draft {
  metadata: MetadataDoc;
  review: ReviewNote[];
  rows: number;
}

export interface UploadState {
  size: number;
  received: number;
  stage: string;
  step: number;
  steps: number;
}

/** The YAML an admin edits: review notes ride along as comments, so they survive a round trip to the form. */
export function toYaml(doc: MetadataDoc, review: ReviewNote[] = []): string {
  const notes = review.map(n => `# REVIEW ${n.column ? `${n.column}.` : ''}${n.field}: ${n.note}`);
  return [...notes, yaml.dump(doc, { flowLevel: 3, lineWidth: 110, noRefs: true })].join('\n');
}

/** Parse the admin's YAML (the JSON schema only: no custom tags); a failure names its line. */
export function fromYaml(text: string): MetadataDoc {
  let doc: unknown;
  try {
    doc = yaml.load(text, { schema: yaml.JSON_SCHEMA });
  } catch (err) {
    const mark = (err as { mark?: { line: number } }).mark;
    const reason = (err as { reason?: string }).reason ?? 'not valid YAML';
    throw new Error(mark ? `YAML line ${mark.line + 1}: ${reason}` : `the YAML is not valid: ${reason}`);
  }
  if (!doc || typeof doc !== 'object' || Array.isArray(doc)) {
    throw new Error('the metadata must be a mapping with privacy_unit, max_rows and columns');
  }
  const columns = (doc as MetadataDoc).columns;
  if (!columns || typeof columns !== 'object' || Array.isArray(columns)) {
    throw new Error("the metadata needs 'columns': a mapping of column name to its type and bounds");
  }
  return doc as MetadataDoc;
}

/** Categories as the form shows them: comma-separated. */
export function categoriesText(values: ColumnSpec['categories']): string {
  return (values ?? []).map(String).join(', ');
}

/** The form's categories text back to typed values; empty text means no categories. */
export function parseCategories(text: string, type: ColumnSpec['type']): ColumnSpec['categories'] {
  const parts = text
    .split(',')
    .map(p => p.trim())
    .filter(p => p !== '');
  if (!parts.length) {
    return undefined;
  }
  if (type === 'int') {
    return parts.map(p => {
      if (!/^-?\d+$/.test(p)) {
        throw new Error(`'${p}' is not a whole number`);
      }
      return Number(p);
    });
  }
  if (type === 'bool') {
    return parts.map(p => p === 'true');
  }
  return parts;
}

/** One column edited in the form: a new spec, or an error that names the column and the field. */
export function editColumn(
  name: string,
  spec: ColumnSpec,
  field: 'type' | 'nullable' | 'lower' | 'upper' | 'categories' | 'description',
  value: string | boolean
): ColumnSpec {
  const next: ColumnSpec = { ...spec };
  if (field === 'type') {
    next.type = value as ColumnSpec['type'];
  } else if (field === 'nullable') {
    next.nullable = Boolean(value);
  } else if (field === 'lower' || field === 'upper') {
    const text = String(value).trim();
    const bounds: [number, number] = [...(spec.bounds ?? [NaN, NaN])] as [number, number];
    bounds[field === 'lower' ? 0 : 1] = text === '' ? NaN : Number(text);
    if (text !== '' && !Number.isFinite(Number(text))) {
      throw new Error(`column '${name}': the ${field} bound must be a number`);
    }
    if (Number.isNaN(bounds[0]) && Number.isNaN(bounds[1])) {
      delete next.bounds;
    } else {
      next.bounds = bounds;
    }
  } else if (field === 'categories') {
    try {
      const values = parseCategories(String(value), spec.type);
      if (values) {
        next.categories = values;
      } else {
        delete next.categories;
      }
    } catch (err) {
      throw new Error(`column '${name}': ${(err as Error).message}`);
    }
  } else {
    next.description = String(value);
  }
  return next;
}

/** What the form can check before sending (the service checks everything again, against the data). */
export function formProblems(doc: MetadataDoc): string[] {
  const problems: string[] = [];
  if (!(Number.isInteger(doc.privacy_unit) && doc.privacy_unit >= 1)) {
    problems.push('privacy_unit must be a whole number of at least 1');
  }
  if (!(Number.isInteger(doc.max_rows) && doc.max_rows >= 1)) {
    problems.push('max_rows must be a whole number of at least 1');
  }
  for (const [name, spec] of Object.entries(doc.columns)) {
    if (spec.bounds) {
      const [lo, hi] = spec.bounds;
      if (Number.isNaN(lo) || Number.isNaN(hi)) {
        problems.push(`column '${name}': give both bounds, or neither`);
      } else if (lo >= hi) {
        problems.push(`column '${name}': the lower bound must be below the upper bound`);
      }
    }
  }
  return problems;
}

/** The public metadata of one column as the panel lists it. */
export function describeColumn(spec: ColumnSpec): string {
  const parts: string[] = [spec.type, spec.nullable === false ? 'no missing values' : 'may be missing'];
  if (spec.bounds) {
    parts.push(`bounds [${spec.bounds[0]}, ${spec.bounds[1]}]`);
  }
  if (spec.categories) {
    const shown = spec.categories.slice(0, 12).map(String).join(', ');
    parts.push(`categories ${shown}${spec.categories.length > 12 ? `, … (${spec.categories.length})` : ''}`);
  }
  return parts.join('; ');
}

/** The byte ranges an upload sends, in order. */
/** A file size people read: 512 B, 8.6 KB, 12.3 MB, 1.5 GB (never "0.0 MB" for a small file). */
export function formatSize(bytes: number): string {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

export function chunkRanges(size: number, chunk: number): [number, number][] {
  const ranges: [number, number][] = [];
  for (let start = 0; start < size; start += chunk) {
    ranges.push([start, Math.min(start + chunk, size)]);
  }
  return ranges;
}

function megabytes(bytes: number): string {
  return `${(bytes / 1e6).toFixed(bytes < 1e7 ? 1 : 0)} MB`;
}

/** Progress as a fraction and a line: bytes while uploading, then the import's stages. */
export function progressOf(state: UploadState, importing: boolean): { value: number; text: string } {
  if (state.stage.startsWith('refused')) {
    return { value: 0, text: `Import ${state.stage}` };
  }
  if (!importing) {
    const value = state.size ? state.received / state.size : 1;
    return {
      value,
      text: `Uploading: ${Math.round(value * 100)}% (${megabytes(state.received)} of ${megabytes(state.size)})`
    };
  }
  if (state.step === 0) {
    return { value: 0, text: 'Import: waiting for the service' };
  }
  return { value: state.step / (state.steps + 1), text: `Import step ${state.step} of ${state.steps}: ${state.stage}` };
}

/** Base64 (the contents API's binary format) to bytes. */
export function base64Bytes(text: string): Uint8Array {
  const binary = atob(text.replace(/\s/g, ''));
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) {
    bytes[i] = binary.charCodeAt(i);
  }
  return bytes;
}

/** The file's format from its name, or null when it is neither CSV nor Parquet. */
export function formatOf(filename: string): 'csv' | 'parquet' | null {
  const lower = filename.toLowerCase();
  return lower.endsWith('.csv') ? 'csv' : lower.endsWith('.parquet') ? 'parquet' : null;
}

/** A dataset name proposed from the file name (the service's rule: letters, digits, underscores). */
export function datasetNameOf(filename: string): string {
  const stem = (filename.split('/').pop() ?? '').replace(/\.[^.]*$/, '');
  const cleaned = stem.replace(/[^A-Za-z0-9_]/g, '_').replace(/^([0-9])/, '_$1');
  return cleaned.slice(0, 64) || 'dataset';
}
