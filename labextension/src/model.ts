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
  username?: string;
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

// --- admin view ------------------------------------------------------------------------------------------

export interface LedgerRow {
  id: number;
  reservation_id: string;
  username: string;
  dataset: string;
  kind: string;
  epsilon: number;
  delta: number;
  created_at: string;
  [key: string]: unknown;
}

export interface LedgerFilter {
  user?: string;
  dataset?: string;
  /** ISO date or date-time: rows at or after it */
  since?: string;
}

export function filterLedger(rows: LedgerRow[], filter: LedgerFilter): LedgerRow[] {
  return rows.filter(
    r =>
      (!filter.user || r.username === filter.user) &&
      (!filter.dataset || r.dataset === filter.dataset) &&
      (!filter.since || r.created_at >= filter.since)
  );
}

const LEDGER_COLUMNS = ['id', 'created_at', 'username', 'dataset', 'kind', 'epsilon', 'delta', 'reservation_id'];

/** RFC 4180 CSV: quoted where needed, numbers at full precision. */
export function ledgerCsv(rows: LedgerRow[]): string {
  const quote = (value: unknown): string => {
    const text = value === null || value === undefined ? '' : String(value);
    return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  };
  const lines = [LEDGER_COLUMNS.join(',')];
  for (const row of rows) {
    lines.push(LEDGER_COLUMNS.map(c => quote(row[c])).join(','));
  }
  return lines.join('\r\n') + '\r\n';
}

export interface SpendPoint {
  when: string;
  spent: number;
}

/** Cumulative ε of releases over time (one dataset; one user or everyone), starting from 0. */
export function burnDown(releases: ReleaseRecord[], dataset: string, user = ''): SpendPoint[] {
  const chosen = releases
    .filter(r => r.dataset === dataset && (!user || r.username === user))
    .sort((a, b) => (a.created_at < b.created_at ? -1 : a.created_at > b.created_at ? 1 : a.id - b.id));
  let total = 0;
  const points: SpendPoint[] = chosen.length ? [{ when: chosen[0].created_at, spent: 0 }] : [];
  for (const r of chosen) {
    total += r.epsilon;
    points.push({ when: r.created_at, spent: total });
  }
  return points;
}

/** An SVG step path of the points, x by order of release, y against `ceiling` (the grant). */
export function stepPath(points: SpendPoint[], width: number, height: number, ceiling: number): string {
  if (!points.length) {
    return '';
  }
  const top = Math.max(ceiling, ...points.map(p => p.spent), 1e-12);
  const x = (i: number) => (points.length === 1 ? 0 : (i / (points.length - 1)) * width);
  const y = (v: number) => height - (v / top) * height;
  let path = `M${x(0).toFixed(1)},${y(points[0].spent).toFixed(1)}`;
  for (let i = 1; i < points.length; i++) {
    path += ` H${x(i).toFixed(1)} V${y(points[i].spent).toFixed(1)}`;
  }
  return path;
}
