import { describe, expect, it } from 'vitest';

import {
  MetadataDoc,
  base64Bytes,
  chunkRanges,
  datasetNameOf,
  describeColumn,
  editColumn,
  formProblems,
  formatOf,
  formatSize,
  fromYaml,
  parseCategories,
  progressOf,
  toYaml
} from './metadata';

const doc: MetadataDoc = {
  description: 'birds',
  privacy_unit: 1,
  max_rows: 500,
  columns: {
    species: { type: 'string', nullable: false, categories: ['Adelie', 'Gentoo'] },
    mass: { type: 'int', nullable: true, bounds: [2000, 7000] },
    year: { type: 'int', nullable: false, bounds: [2007, 2009], categories: [2007, 2008, 2009] }
  }
};

describe('YAML', () => {
  it('round-trips the metadata and carries review notes as comments', () => {
    const text = toYaml(doc, [{ column: 'mass', field: 'bounds', note: 'from the data' }]);
    expect(text.split('\n')[0]).toBe('# REVIEW mass.bounds: from the data');
    expect(fromYaml(text)).toEqual(doc);
  });

  it('names the line of a syntax error and refuses what is not metadata', () => {
    expect(() => fromYaml('privacy_unit: 1\ncolumns:\n  a: [1, 2\n')).toThrow(/YAML line \d+/);
    expect(() => fromYaml('- 1\n- 2\n')).toThrow(/mapping/);
    expect(() => fromYaml('privacy_unit: 1\nmax_rows: 10\n')).toThrow(/columns/);
  });

  it('reads no custom tags (the JSON schema only)', () => {
    expect(() => fromYaml('columns: !!js/function "function () {}"\n')).toThrow();
  });
});

describe('the form', () => {
  it('types categories by the column type and names a bad one', () => {
    expect(parseCategories('2007, 2008', 'int')).toEqual([2007, 2008]);
    expect(parseCategories(' a ,b,, ', 'string')).toEqual(['a', 'b']);
    expect(parseCategories('  ', 'string')).toBeUndefined();
    expect(() => editColumn('year', doc.columns.year, 'categories', '2007, x')).toThrow(/column 'year'.*'x'/);
  });

  it('edits one field and leaves the rest of the column', () => {
    const wider = editColumn('mass', doc.columns.mass, 'upper', '8000');
    expect(wider).toEqual({ type: 'int', nullable: true, bounds: [2000, 8000] });
    expect(doc.columns.mass.bounds).toEqual([2000, 7000]);
    const noBounds = editColumn('mass', editColumn('mass', wider, 'lower', ''), 'upper', '');
    expect(noBounds.bounds).toBeUndefined();
    expect(() => editColumn('mass', wider, 'lower', 'abc')).toThrow(/lower bound must be a number/);
    expect(editColumn('species', doc.columns.species, 'categories', '').categories).toBeUndefined();
  });

  it('finds what the service would refuse before sending', () => {
    expect(formProblems(doc)).toEqual([]);
    const bad: MetadataDoc = {
      ...doc,
      max_rows: 0,
      columns: { a: { type: 'float', bounds: [5, 1] }, b: { type: 'int', bounds: [NaN, 3] } }
    };
    expect(formProblems(bad)).toEqual([
      'max_rows must be a whole number of at least 1',
      "column 'a': the lower bound must be below the upper bound",
      "column 'b': give both bounds, or neither"
    ]);
  });

  it('describes a column in one line and shortens long category lists', () => {
    expect(describeColumn(doc.columns.mass)).toBe('int; may be missing; bounds [2000, 7000]');
    const many = { type: 'string' as const, categories: Array.from({ length: 20 }, (_, i) => `c${i}`) };
    expect(describeColumn(many)).toMatch(/c11, … \(20\)$/);
  });
});

describe('uploads', () => {
  it('cuts a file into ordered chunks that cover it exactly', () => {
    expect(chunkRanges(5, 2)).toEqual([
      [0, 2],
      [2, 4],
      [4, 5]
    ]);
    expect(chunkRanges(0, 2)).toEqual([]);
    const ranges = chunkRanges(10_000_001, 2 * 1024 * 1024);
    expect(ranges[ranges.length - 1][1]).toBe(10_000_001);
  });

  it('shows bytes while uploading, then the import stages, then a refusal as it is', () => {
    const state = { size: 4_000_000, received: 1_000_000, stage: 'uploading', step: 0, steps: 3 };
    expect(progressOf(state, false)).toEqual({ value: 0.25, text: 'Uploading: 25% (1.0 MB of 4.0 MB)' });
    const checking = { ...state, received: 4_000_000, stage: 'checking the data against the metadata', step: 2 };
    expect(progressOf(checking, true)).toEqual({
      value: 0.5,
      text: 'Import step 2 of 3: checking the data against the metadata'
    });
    const refused = { ...checking, stage: "refused: the data has no column(s) ['beak']" };
    expect(progressOf(refused, true).text).toBe("Import refused: the data has no column(s) ['beak']");
  });

  it('decodes base64, knows the formats and proposes a dataset name', () => {
    expect(Array.from(base64Bytes('AAEC\n/w=='))).toEqual([0, 1, 2, 255]);
    expect(formatOf('data/Visits.CSV')).toBe('csv');
    expect(formatOf('a.parquet')).toBe('parquet');
    expect(formatOf('a.xlsx')).toBeNull();
    expect(datasetNameOf('data/2024 visits-v2.csv')).toBe('_2024_visits_v2');
  });
});

describe('formatSize', () => {
  it('reads well at every scale, and a small file is never 0.0 MB', () => {
    expect(formatSize(512)).toBe('512 B');
    expect(formatSize(8600)).toBe('8.6 KB');
    expect(formatSize(12_345_678)).toBe('12 MB');
    expect(formatSize(1_500_000_000)).toBe('1.5 GB');
  });
});
