import { describe, expect, it } from 'vitest';

import {
  apiBase,
  burnDown,
  dpqueryCell,
  filterLedger,
  fmt,
  gauges,
  ledgerCsv,
  recentReleases,
  releaseTable,
  stepPath
} from './model';

const budget = (total: number, spent: number, deltaTotal = 0) => ({
  dataset: 'penguins',
  epsilon_total: total,
  epsilon_spent: spent,
  epsilon_remaining: Math.max(total - spent, 0),
  delta_total: deltaTotal,
  delta_spent: 0,
  delta_remaining: deltaTotal,
  releases: 1
});

describe('fmt', () => {
  it('reads like the notebook: separators, 4 significant digits, exponent only for extremes', () => {
    expect(fmt(12345)).toBe('12,345');
    expect(fmt(0.123456)).toBe('0.1235');
    expect(fmt(7.5)).toBe('7.5');
    expect(fmt(1e-6)).toBe('0.000001');
    expect(fmt(1e-9)).toBe('1.00e-9');
    expect(fmt(0)).toBe('0');
  });
});

describe('gauges', () => {
  it('shows the share of the grant left, clamped, and says when there is no grant', () => {
    const [granted, overspent, none] = gauges([
      { name: 'penguins', description: 'd', budget: budget(10, 2.5, 1e-6) },
      { name: 'b', description: '', budget: budget(1, 1.2) },
      { name: 'c', description: '', budget: null }
    ]);
    expect(granted.remainingShare).toBeCloseTo(0.75);
    expect(granted.label).toBe('ε 7.5 of 10 left');
    expect(granted.deltaLabel).toBe('δ 0.000001 of 0.000001 left');
    expect(overspent.remainingShare).toBe(0);
    expect(overspent.deltaLabel).toBe('');
    expect(none.granted).toBe(false);
    expect(none.label).toContain('no grant');
  });
});

describe('dpqueryCell', () => {
  it('groups by a public category and averages a bounded number', () => {
    const cell = dpqueryCell('penguins', {
      bill: { type: 'float', bounds: [30, 60] },
      species: { type: 'str', categories: ['Adelie', 'Gentoo'] }
    });
    expect(cell).toBe(
      '%%dpquery penguins --epsilon 0.5 --preview\nSELECT species, COUNT(*) AS n, AVG(bill) AS mean_bill\n' +
        'FROM penguins\nGROUP BY species'
    );
  });

  it('falls back to a plain count when nothing is groupable or bounded', () => {
    expect(dpqueryCell('t', { x: { type: 'str' } }, 1)).toBe('%%dpquery t --epsilon 1 --preview\nSELECT COUNT(*) AS n\nFROM t');
  });
});

describe('releases', () => {
  const record = (id: number, when: string, delta = 0) => ({
    id,
    dataset: 'penguins',
    sql: 'SELECT  COUNT(*)\n FROM penguins',
    epsilon: 0.5,
    delta,
    created_at: when,
    result: { columns: ['species', 'n'], rows: [['Adelie', 152.0], [null, 3]] }
  });

  it('lists the newest first with one-line SQL and the cost', () => {
    const rows = recentReleases([record(1, '2026-01-01T10:00:00'), record(2, '2026-01-02T10:00:00', 1e-6)], 1);
    expect(rows).toEqual([
      { id: 2, title: 'SELECT COUNT(*) FROM penguins', cost: 'ε 0.5, δ 0.000001', when: '2026-01-02 10:00:00' }
    ]);
  });

  it('turns a stored result into strings, NULL included, rows as lists or objects', () => {
    expect(releaseTable(record(1, 'x')).rows).toEqual([['Adelie', '152'], ['NULL', '3']]);
    const asObjects = { ...record(1, 'x'), result: { columns: ['n'], rows: [{ n: 1234 }] } };
    expect(releaseTable(asObjects).rows).toEqual([['1,234']]);
  });
});

describe('apiBase', () => {
  it('uses the configured service, else this server', () => {
    expect(apiBase('', '/user/ann/')).toBe('/user/ann/lomas/api/');
    expect(apiBase(' https://hub.example.org/services/lomas/ ', '/')).toBe(
      'https://hub.example.org/services/lomas/lomas/api/'
    );
  });
});

describe('admin: ledger and burn-down', () => {
  const row = (id: number, username: string, dataset: string, when: string, epsilon = 0.5) => ({
    id,
    reservation_id: `r${id}`,
    username,
    dataset,
    kind: 'commit',
    epsilon,
    delta: 0,
    created_at: when
  });
  const ledger = [
    row(1, 'ann', 'penguins', '2026-01-01T10:00:00'),
    row(2, 'bob', 'penguins', '2026-02-01T10:00:00'),
    row(3, 'ann', 'sales, "EU"', '2026-03-01T10:00:00')
  ];

  it('filters by user, dataset and date', () => {
    expect(filterLedger(ledger, { user: 'ann' }).map(r => r.id)).toEqual([1, 3]);
    expect(filterLedger(ledger, { dataset: 'penguins', since: '2026-01-15' }).map(r => r.id)).toEqual([2]);
    expect(filterLedger(ledger, {}).length).toBe(3);
  });

  it('exports CSV with quoting', () => {
    const lines = ledgerCsv(ledger).split('\r\n');
    expect(lines[0]).toBe('id,created_at,username,dataset,kind,epsilon,delta,reservation_id');
    expect(lines[3]).toBe('3,2026-03-01T10:00:00,ann,"sales, ""EU""",commit,0.5,0,r3');
    expect(lines[4]).toBe('');
  });

  it('accumulates spending from 0, for one user or everyone, and draws a step path against the grant', () => {
    const releases = ledger.map(r => ({ ...r, sql: 'q', result: {} }));
    expect(burnDown(releases, 'penguins').map(p => p.spent)).toEqual([0, 0.5, 1]);
    expect(burnDown(releases, 'penguins', 'bob').map(p => p.spent)).toEqual([0, 0.5]);
    expect(burnDown(releases, 'nothing')).toEqual([]);
    const path = stepPath(burnDown(releases, 'penguins'), 100, 50, 2);
    expect(path).toBe('M0.0,50.0 H50.0 V37.5 H100.0 V25.0');
    expect(stepPath([], 100, 50, 2)).toBe('');
  });
});
