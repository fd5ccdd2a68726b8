/**
 * The panel's data logic, free of JupyterLab so that it is unit-tested on its own (vitest).
 */

export interface Budget {
  dataset: string;
  epsilon_total: number;
  epsilon_spent: number;
  epsilon_remaining: number;
  delta_total: number;
  delta_spent: number;
  delta_remaining: number;
  releases: number;
  pending?: number;
}

export interface DatasetInfo {
  name: string;
  description: string;
  budget?: Budget | null;
}

export interface ColumnMeta {
  type: string;
  nullable?: boolean;
  bounds?: [number, number] | null;
  categories?: unknown[] | null;
}

export interface ReleaseRecord {
  id: number;
  dataset: string;
  sql: string;
  epsilon: number;
  delta: number;
  created_at: string;
  result: { columns?: string[]; rows?: unknown[][] | Record<string, unknown>[] };
}

export interface Gauge {
  dataset: string;
  description: string;
  /** share of the grant still available, 0..1 */
  remainingShare: number;
  label: string;
  deltaLabel: string;
  granted: boolean;
}

/** Numbers as people read them: up to 4 significant digits, no exponent for ordinary values. */
export function fmt(value: number): string {
  if (!Number.isFinite(value)) {
    return String(value);
  }
  if (value !== 0 && (Math.abs(value) < 1e-6 || Math.abs(value) >= 1e15)) {
    return value.toExponential(2);
  }
  if (Number.isInteger(value)) {
    return value.toLocaleString('en-US');
  }
  return Number(value.toPrecision(4)).toLocaleString('en-US', { maximumFractionDigits: 10 });
}

export function gauges(datasets: DatasetInfo[]): Gauge[] {
  return datasets.map(d => {
    const b = d.budget;
    if (!b || !(b.epsilon_total > 0)) {
      return {
        dataset: d.name,
        description: d.description,
        remainingShare: 0,
        label: 'no grant: ask an admin',
        deltaLabel: '',
        granted: false
      };
    }
    const share = Math.min(Math.max(b.epsilon_remaining / b.epsilon_total, 0), 1);
    return {
      dataset: d.name,
      description: d.description,
      remainingShare: share,
      label: `ε ${fmt(b.epsilon_remaining)} of ${fmt(b.epsilon_total)} left`,
      deltaLabel: b.delta_total > 0 ? `δ ${fmt(b.delta_remaining)} of ${fmt(b.delta_total)} left` : '',
      granted: true
    };
  });
}

/** A ready %%dpquery cell for a dataset, built from its public metadata: one grouped count and mean. */
export function dpqueryCell(dataset: string, columns: Record<string, ColumnMeta>, epsilon = 0.5): string {
  const names = Object.keys(columns);
  const group = names.find(n => (columns[n].categories ?? []).length > 0);
  const numeric = names.find(n => columns[n].bounds && ['float', 'int'].includes(columns[n].type));
  const parts = ['COUNT(*) AS n'];
  if (numeric) {
    parts.push(`AVG(${numeric}) AS mean_${numeric}`);
  }
  const select = group ? [group, ...parts] : parts;
  const tail = group ? `\nGROUP BY ${group}` : '';
  return `%%dpquery ${dataset} --epsilon ${epsilon} --preview\nSELECT ${select.join(', ')}\nFROM ${dataset}${tail}`;
}

export interface ReleaseRow {
  id: number;
  title: string;
  cost: string;
  when: string;
}

export function recentReleases(archive: ReleaseRecord[], limit = 10): ReleaseRow[] {
  return [...archive]
    .sort((a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1 : b.id - a.id))
    .slice(0, limit)
    .map(r => ({
      id: r.id,
      title: r.sql.replace(/\s+/g, ' ').trim(),
      cost: r.delta > 0 ? `ε ${fmt(r.epsilon)}, δ ${fmt(r.delta)}` : `ε ${fmt(r.epsilon)}`,
      when: r.created_at.slice(0, 19).replace('T', ' ')
    }));
}

/** A release's table as rows of strings, whichever shape (list of lists or of objects) it was stored in. */
export function releaseTable(record: ReleaseRecord): { columns: string[]; rows: string[][] } {
  const columns = record.result.columns ?? [];
  const rows = (record.result.rows ?? []).map(row =>
    Array.isArray(row)
      ? row.map(cell)
      : columns.map(c => cell((row as Record<string, unknown>)[c]))
  );
  return { columns, rows };
}

function cell(value: unknown): string {
  if (value === null || value === undefined) {
    return 'NULL';
  }
  return typeof value === 'number' ? fmt(value) : String(value);
}

/** Where the API lives: the configured remote service, else this Jupyter server's embedded one. */
export function apiBase(serviceUrl: string, serverBaseUrl: string): string {
  const base = (serviceUrl.trim() || serverBaseUrl).replace(/\/+$/, '');
  return `${base}/lomas/api/`;
}
