import { ApiError, LomasApi } from './api';
import { DatasetRow, DatasetsPart, PickFromBrowser, SourceFile } from './datasets';
import { button, el, keptOpen } from './dom';
import { BudgetRequestRow, pendingRequests } from './requests';
import {
  LedgerRow,
  ReleaseRecord,
  burnDown,
  filterLedger,
  fmt,
  ledgerCsv,
  stepPath
} from './model';

interface UserRow {
  username: string;
  role: string;
}

interface CourseRow {
  name: string;
  hub_group: string;
  members: string[];
  /** under JupyterHub: in the group, but not yet a member (they join on their first request) */
  waiting?: string[];
  datasets: { dataset: string; epsilon_per_student: number; epsilon_cap: number }[];
}

interface ClassSpending {
  epsilon_cap: number;
  epsilon_spent: number;
  per_student: Record<string, { epsilon_spent: number; releases: number }>;
}

interface GrantRow {
  username: string;
  dataset: string;
  epsilon: number;
  delta: number;
}

interface AdminData {
  users: UserRow[];
  grants: GrantRow[];
  ledger: LedgerRow[];
  releases: ReleaseRecord[];
  courses: CourseRow[];
  datasets: DatasetRow[];
  waiting: BudgetRequestRow[];
  /** keyed by course and dataset */
  spending: Map<string, ClassSpending>;
}

type Say = (message: string, ok?: boolean) => void;

function select(label: string, options: string[], value = '', any = 'everyone'): HTMLSelectElement {
  const node = el('select', { 'aria-label': label, class: 'lomas-sb-input' });
  for (const option of options) {
    const item = el('option', { value: option }, option || any);
    item.selected = option === value;
    node.append(item);
  }
  return node;
}

function input(label: string, attrs: Record<string, string> = {}): HTMLInputElement {
  return el('input', { 'aria-label': label, class: 'lomas-sb-input', ...attrs });
}

/**
 * The admin view: users, grants, spending. Rebuilt from the API on demand (not on every poll, so that a form
 * being filled in is never reset); every action reports one line and re-reads what it changed.
 */
export class AdminView {
  readonly node = el('section', { class: 'lomas-sb-admin', 'aria-label': 'Administration' });
  /** kept across reloads: a token is shown once and must stay until copied */
  private tokenBox = el('div', { class: 'lomas-sb-token', 'aria-live': 'polite' });
  private tokenCopied = false;
  private content = el('div');
  private filter = { user: '', dataset: '', since: '' };
  /** which parts are open, kept across reloads */
  private opened = new Set(['users', 'spending']);
  private chartDataset = '';
  private chartUser = '';
  private datasets: DatasetsPart;
  /** budget requests waiting for a decision (the sidebar's badge) */
  pending = 0;
  private loadsStarted = 0;

  constructor(
    private api: LomasApi,
    private say: Say,
    pickFromBrowser: PickFromBrowser | null = null
  ) {
    // a copied token's box goes away with the next action: only an uncopied one stays (it is shown once)
    this.say = (message: string, ok?: boolean) => {
      if (this.tokenCopied && message !== 'token copied') {
        this.tokenBox.replaceChildren();
        this.tokenCopied = false;
      }
      say(message, ok);
    };
    this.node.append(el('h3', {}, 'Administration'), this.tokenBox, this.content);
    this.datasets = new DatasetsPart(api, this.say, pickFromBrowser, () => this.load(true));
  }

  /** Open the Datasets part and start registering this file (the file browser's context menu). */
  async register(file: SourceFile): Promise<void> {
    this.opened.add('datasets');
    const part = this.content.querySelector<HTMLDetailsElement>('details[data-part="datasets"]');
    if (part) {
      part.open = true;
    }
    this.datasets.form.scrollIntoView({ block: 'nearest' });
    await this.datasets.useFile(file);
  }

  /** True while an admin is filling in a form here: a periodic reload would wipe it. */
  get editing(): boolean {
    const active = document.activeElement;
    if (active && this.content.contains(active) && active.tagName !== 'BUTTON' && active.tagName !== 'SUMMARY') {
      return true;
    }
    return Array.from(this.content.querySelectorAll('input')).some(i =>
      i.type === 'checkbox' ? i.checked : i.type !== 'date' && i.value !== ''
    );
  }

  /** Re-read and rebuild; a periodic reload (not `force`) never replaces a form being filled in, even one
   *  the admin started while the data was on its way. Everything is read before that check and the view is built
   *  without waiting after it: a wait in between let a reload wipe what was typed meanwhile (the budget-request
   *  box: an instructor's amount vanished and "Approve" then asked for the whole request). A load that a newer
   *  one overtook is dropped, so older data never replaces newer. */
  async load(force = false): Promise<void> {
    const ticket = ++this.loadsStarted;
    this.node.setAttribute('aria-busy', 'true');
    try {
      const read = await this.read();
      if (ticket !== this.loadsStarted) {
        return;
      }
      if (read.waiting.length > this.pending) {
        this.opened.add('requests'); // new requests: show them
      }
      this.pending = read.waiting.length;
      if (!force && this.editing) {
        return;
      }
      this.render(read);
    } finally {
      if (ticket === this.loadsStarted) {
        this.node.removeAttribute('aria-busy');
      }
    }
  }

  /** Everything the view shows, in one round of requests (and one more per course plan for its spending). */
  private async read(): Promise<AdminData> {
    const [users, grants, ledger, releases, courses, datasets, waiting] = await Promise.all([
      this.api.call<UserRow[]>('GET', 'admin/users'),
      this.api.call<GrantRow[]>('GET', 'admin/grants'),
      this.api.call<LedgerRow[]>('GET', 'admin/ledger?limit=10000'),
      this.api.call<ReleaseRecord[]>('GET', 'admin/archive?limit=10000'),
      this.api.call<CourseRow[]>('GET', 'admin/courses'),
      this.api.call<DatasetRow[]>('GET', 'admin/datasets'),
      this.api.call<BudgetRequestRow[]>('GET', 'admin/requests?status=pending')
    ]);
    const plans = courses.flatMap(course => course.datasets.map(plan => ({ course: course.name, dataset: plan.dataset })));
    const spent = await Promise.all(
      plans.map(plan =>
        this.api.call<ClassSpending>(
          'GET',
          `admin/courses/${encodeURIComponent(plan.course)}/spending/${encodeURIComponent(plan.dataset)}`
        )
      )
    );
    const spending = new Map(plans.map((plan, i) => [`${plan.course}\u0000${plan.dataset}`, spent[i]]));
    return { users, grants, ledger, releases, courses, datasets, waiting, spending };
  }

  private render({ users, grants, ledger, releases, courses, datasets, waiting, spending }: AdminData): void {
    const names = datasets.map(d => d.name);
    this.chartDataset = names.includes(this.chartDataset) ? this.chartDataset : names[0] ?? '';
    const datasetsPart = this.part('datasets', `Datasets (${datasets.length})`);
    datasetsPart.append(this.datasets.list(datasets), this.datasets.form);
    const requestsPart = this.part('requests', `Budget requests (${waiting.length} waiting)`);
    requestsPart.append(
      ...(waiting.length
        ? pendingRequests(this.api, waiting, work => this.act(work))
        : [el('p', { class: 'lomas-sb-who' }, 'No request is waiting.')])
    );
    this.content.replaceChildren(
      requestsPart,
      this.usersSection(users),
      datasetsPart,
      this.grantsSection(users, names, grants),
      this.coursesSection(courses, names, spending),
      this.spendingSection(users, names, grants, ledger, releases)
    );
  }

  private part(key: string, title: string): HTMLDetailsElement {
    const section = keptOpen(el('details', { class: 'lomas-sb-admin-part', 'data-part': key }), this.opened, key);
    section.append(el('summary', {}, title));
    return section;
  }

  private async act(work: () => Promise<string>): Promise<void> {
    try {
      this.say(await work(), true);
      await this.load(true);
    } catch (err) {
      this.say(err instanceof ApiError ? err.message : String(err));
    }
  }

  private usersSection(users: UserRow[]): HTMLElement {
    const section = this.part('users', `Users (${users.length})`);
    const table = el('table', { class: 'lomas-sb-table' });
    for (const user of users) {
      const row = el('tr');
      row.append(el('td', {}, user.username));
      const role = select(`Role of ${user.username}`, ['analyst', 'admin'], user.role);
      role.addEventListener('change', () =>
        void this.act(async () => {
          await this.api.call('PATCH', `admin/users/${encodeURIComponent(user.username)}`, { role: role.value });
          return `${user.username} is now ${role.value}`;
        })
      );
      const cell = el('td');
      cell.append(role);
      row.append(cell);
      const actions = el('td');
      actions.append(
        button('Issue token', `Issue a token for ${user.username}`, () => void this.issueToken(user.username)),
        button('Revoke tokens', `Revoke every token of ${user.username}`, () =>
          void this.act(async () => {
            const out = await this.api.call<{ revoked: number }>(
              'DELETE',
              `admin/users/${encodeURIComponent(user.username)}/tokens`
            );
            return `revoked ${out.revoked} token(s) of ${user.username}`;
          })
        )
      );
      row.append(actions);
      table.append(row);
    }
    section.append(table);
    const name = input('New user name', { placeholder: 'new user name' });
    const role = select('New user role', ['analyst', 'admin']);
    section.append(
      name,
      role,
      button('Add user', 'Add the user', () =>
        void this.act(async () => {
          await this.api.call('POST', 'admin/users', { username: name.value.trim(), role: role.value });
          return `added ${name.value.trim()} (${role.value})`;
        })
      )
    );
    return section;
  }

  private async issueToken(username: string): Promise<void> {
    try {
      const out = await this.api.call<{ token: string }>('POST', `admin/users/${encodeURIComponent(username)}/tokens`, {
        label: 'sidebar'
      });
      const box = this.tokenBox;
      const field = input(`New token of ${username}`, { readonly: 'true', class: 'lomas-sb-input lomas-sb-token-value' });
      field.value = out.token;
      box.replaceChildren(
        el('p', {}, `Token for ${username}, shown once: copy it now.`),
        field,
        button('Copy', `Copy the token of ${username}`, () => {
          field.select();
          void navigator.clipboard?.writeText(out.token).catch(() => document.execCommand('copy'));
          this.tokenCopied = true;
          this.say('token copied', true);
        }),
        button('Done', 'Hide the token', () => box.replaceChildren())
      );
      this.tokenCopied = false;
      this.say(`issued a token for ${username}`, true);
    } catch (err) {
      this.say(err instanceof ApiError ? err.message : String(err));
    }
  }

  private grantsSection(users: UserRow[], datasets: string[], grants: GrantRow[]): HTMLElement {
    const section = this.part('grants', `Grants (${grants.length})`);
    const table = el('table', { class: 'lomas-sb-table' });
    const head = el('tr');
    ['user', 'dataset', 'ε', 'δ'].forEach(c => head.append(el('th', { scope: 'col' }, c)));
    table.append(head);
    for (const g of grants) {
      const row = el('tr');
      [g.username, g.dataset, fmt(g.epsilon), fmt(g.delta)].forEach(v => row.append(el('td', {}, v)));
      table.append(row);
    }
    section.append(table);
    const who = el('fieldset', { class: 'lomas-sb-form' });
    who.append(el('legend', {}, 'Users'));
    const boxes = users.map(u => {
      const label = el('label');
      const box = el('input', { type: 'checkbox', value: u.username });
      label.append(box, ` ${u.username}`);
      who.append(label);
      return box;
    });
    const dataset = select('Dataset to grant', datasets);
    const epsilon = input('Epsilon to grant', { type: 'number', min: '0', step: 'any', placeholder: 'ε' });
    const delta = input('Delta to grant', { type: 'number', min: '0', step: 'any', placeholder: 'δ (0)' });
    section.append(
      who,
      dataset,
      epsilon,
      delta,
      button('Set grant', 'Set the grant for the chosen users', () =>
        void this.act(async () => {
          const usernames = boxes.filter(b => b.checked).map(b => b.value);
          if (!usernames.length) {
            throw new ApiError('choose at least one user');
          }
          if (epsilon.value === '' || !(Number(epsilon.value) >= 0)) {
            throw new ApiError('epsilon must be a non-negative number');
          }
          await this.api.call('PUT', 'admin/grants', {
            usernames,
            dataset: dataset.value,
            epsilon: Number(epsilon.value),
            delta: Number(delta.value || 0)
          });
          return `granted ε ${epsilon.value} on ${dataset.value} to ${usernames.join(', ')}`;
        })
      )
    );
    return section;
  }

  private coursesSection(courses: CourseRow[], datasets: string[], spent: Map<string, ClassSpending>): HTMLElement {
    const section = this.part('courses', `Courses (${courses.length})`);
    for (const course of courses) {
      const box = el('div', { class: 'lomas-sb-form', 'data-course': course.name });
      box.append(el('h4', {}, `${course.name} (Hub group ${course.hub_group}): ${course.members.length} student(s)`));
      if (course.waiting?.length) {
        box.append(
          el('p', { class: 'lomas-sb-who' }, `Not started yet (in the Hub group): ${course.waiting.join(', ')}`)
        );
      }
      for (const plan of course.datasets) {
        const spending = spent.get(`${course.name}\u0000${plan.dataset}`)!; // read for this very list of courses
        box.append(
          el(
            'p',
            { class: 'lomas-sb-who' },
            `${plan.dataset}: ε ${fmt(plan.epsilon_per_student)} per student; the class has spent ` +
              `${fmt(spending.epsilon_spent)} of its cap ${fmt(spending.epsilon_cap)}`
          )
        );
        const table = el('table', { class: 'lomas-sb-table' });
        for (const [name, s] of Object.entries(spending.per_student)) {
          const row = el('tr');
          [name, `ε ${fmt(s.epsilon_spent)}`, `${s.releases} release(s)`].forEach(v => row.append(el('td', {}, v)));
          table.append(row);
        }
        box.append(table);
      }
      const student = input(`Student to add to ${course.name}`, { placeholder: 'student' });
      box.append(
        student,
        button('Add student', `Add the student to ${course.name}`, () =>
          void this.act(async () => {
            await this.api.call('POST', `admin/courses/${encodeURIComponent(course.name)}/members`, {
              username: student.value.trim()
            });
            return `${student.value.trim()} joined ${course.name}`;
          })
        )
      );
      section.append(box);
    }
    const name = input('New course name', { placeholder: 'course' });
    const group = input('Hub group of the new course', { placeholder: 'Hub group' });
    section.append(
      name,
      group,
      button('Create course', 'Create the course', () =>
        void this.act(async () => {
          await this.api.call('POST', 'admin/courses', { name: name.value.trim(), hub_group: group.value.trim() });
          return `created course ${name.value.trim()}`;
        })
      )
    );
    const form = el('fieldset', { class: 'lomas-sb-form' });
    form.append(el('legend', {}, 'Attach a dataset or top up'));
    const course = select('Course', courses.map(c => c.name));
    const dataset = select('Dataset of the course', datasets);
    const perStudent = input('Epsilon per student', { type: 'number', min: '0', step: 'any', placeholder: 'ε per student' });
    const cap = input('Epsilon cap of the class', { type: 'number', min: '0', step: 'any', placeholder: 'ε class cap' });
    form.append(
      course,
      dataset,
      perStudent,
      cap,
      button('Set', 'Set the per-student grant and the class cap', () =>
        void this.act(async () => {
          if (perStudent.value === '' || cap.value === '') {
            throw new ApiError('give the epsilon per student and the class cap');
          }
          await this.api.call('PUT', `admin/courses/${encodeURIComponent(course.value)}/datasets`, {
            dataset: dataset.value,
            epsilon_per_student: Number(perStudent.value),
            epsilon_cap: Number(cap.value)
          });
          return `${course.value}: ε ${perStudent.value} per student, class cap ${cap.value} on ${dataset.value}`;
        })
      )
    );
    section.append(form);
    return section;
  }

  private spendingSection(
    users: UserRow[],
    datasets: string[],
    grants: GrantRow[],
    ledger: LedgerRow[],
    releases: ReleaseRecord[]
  ): HTMLElement {
    const section = this.part('spending', 'Spending');
    const dataset = select('Burn-down dataset', datasets, this.chartDataset);
    const user = select('Burn-down user', ['', ...users.map(u => u.username)], this.chartUser);
    const chartBox = el('div');
    const redraw = (): void => {
      this.chartDataset = dataset.value;
      this.chartUser = user.value;
      chartBox.replaceChildren(this.chart(releases, grants, dataset.value, user.value));
    };
    dataset.addEventListener('change', redraw);
    user.addEventListener('change', redraw);
    section.append(dataset, user, chartBox);
    redraw();

    section.append(el('h4', {}, 'Ledger'));
    const fUser = select('Ledger user', ['', ...users.map(u => u.username)], this.filter.user);
    const fDataset = select('Ledger dataset', ['', ...datasets], this.filter.dataset, 'all datasets');
    const fSince = input('Ledger since', { type: 'date', value: this.filter.since });
    const table = el('table', { class: 'lomas-sb-table lomas-sb-ledger' });
    const render = (): void => {
      this.filter = { user: fUser.value, dataset: fDataset.value, since: fSince.value };
      const rows = filterLedger(ledger, this.filter);
      const head = el('tr');
      ['when', 'user', 'dataset', 'kind', 'ε', 'δ'].forEach(c => head.append(el('th', { scope: 'col' }, c)));
      table.replaceChildren(head);
      for (const r of rows.slice(0, 50)) {
        const row = el('tr');
        [r.created_at.slice(0, 19).replace('T', ' '), r.username, r.dataset, r.kind, fmt(r.epsilon), fmt(r.delta)].forEach(
          v => row.append(el('td', {}, v))
        );
        table.append(row);
      }
      count.textContent = `${rows.length} row(s)${rows.length > 50 ? ', the newest 50 shown' : ''}`;
    };
    const count = el('p', { class: 'lomas-sb-who' });
    [fUser, fDataset, fSince].forEach(f => f.addEventListener('change', render));
    const exportButton = button('Export CSV', 'Export the filtered ledger as CSV', () => {
      const blob = new Blob([ledgerCsv(filterLedger(ledger, this.filter))], { type: 'text/csv' });
      const link = el('a', { href: URL.createObjectURL(blob), download: 'lomas-ledger.csv' });
      link.click();
      URL.revokeObjectURL(link.href);
    });
    section.append(fUser, fDataset, fSince, exportButton, count, table);
    render();
    return section;
  }

  private chart(releases: ReleaseRecord[], grants: GrantRow[], dataset: string, user: string): HTMLElement {
    const points = burnDown(releases, dataset, user);
    const granted = grants
      .filter(g => g.dataset === dataset && (!user || g.username === user))
      .reduce((sum, g) => sum + g.epsilon, 0);
    const width = 240;
    const height = 90;
    const top = Math.max(granted, ...points.map(p => p.spent), 1e-12);
    const spent = points.length ? points[points.length - 1].spent : 0;
    const who = user || 'everyone';
    const box = el('figure', { class: 'lomas-sb-chart' });
    const svgNs = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(svgNs, 'svg');
    svg.setAttribute('viewBox', `-2 -2 ${width + 4} ${height + 4}`);
    svg.setAttribute('role', 'img');
    svg.setAttribute('aria-label', `ε spent on ${dataset} by ${who}: ${fmt(spent)} of ${fmt(granted)} granted`);
    const grantLine = document.createElementNS(svgNs, 'line');
    const gy = height - (granted / top) * height;
    Object.entries({ x1: '0', x2: String(width), y1: String(gy), y2: String(gy), class: 'lomas-sb-chart-grant' }).forEach(
      ([k, v]) => grantLine.setAttribute(k, v)
    );
    const path = document.createElementNS(svgNs, 'path');
    path.setAttribute('d', stepPath(points, width, height, granted));
    path.setAttribute('class', 'lomas-sb-chart-spent');
    svg.append(grantLine, path);
    box.append(svg, el('figcaption', {}, `ε spent on ${dataset} by ${who}: ${fmt(spent)} of ${fmt(granted)} granted (dashed)`));
    return box;
  }
}
