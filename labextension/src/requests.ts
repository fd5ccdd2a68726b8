import { ApiError, LomasApi } from './api';
import { button, el } from './dom';
import { fmt } from './model';

/** A budget request as the REST API returns it (`requests`, `admin/requests`). */
export interface BudgetRequestRow {
  id: number;
  username: string;
  dataset: string;
  course: string | null;
  epsilon: number;
  reason: string;
  status: 'pending' | 'approved' | 'declined';
  granted_epsilon: number | null;
  note: string;
  created_at: string;
}

type Say = (message: string, ok?: boolean) => void;

/** One line on a request and its answer, as the student reads it. */
export function requestLine(r: BudgetRequestRow): string {
  const head = `#${r.id} · ε ${fmt(r.epsilon)} on ${r.dataset}`;
  const note = r.note ? ` — ${r.note}` : '';
  if (r.status === 'pending') {
    return `${head}: waiting for your instructor`;
  }
  if (r.status === 'approved') {
    return `${head}: approved, ε ${fmt(r.granted_epsilon ?? 0)} added${note}`;
  }
  return `${head}: declined${note}`;
}

/**
 * The analyst's "ask for more" form. It lives outside the part of the panel that is rebuilt on every refresh,
 * so what the student types is never wiped; a gauge's "Ask for more ε" button opens it for that dataset.
 */
export class RequestForm {
  readonly node = el('form', { class: 'lomas-sb-form lomas-sb-request-form', 'aria-label': 'Ask for more budget' });
  private dataset = '';
  private heading = el('h4', {});
  private amount = el('input', {
    class: 'lomas-sb-input', type: 'number', min: '0', step: '0.1', value: '0.5', 'aria-label': 'ε to ask for'
  });
  private reason = el('input', {
    class: 'lomas-sb-input', placeholder: 'why (your instructor reads it)', 'aria-label': 'Reason for the request',
    maxlength: '500'
  });

  constructor(
    private api: LomasApi,
    private say: Say,
    private sent: () => void
  ) {
    this.node.hidden = true;
    const send = el('button', { type: 'submit', class: 'jp-Button lomas-sb-insert' }, 'Send request');
    const cancel = button('Cancel', 'Close the request form', () => this.close());
    this.node.append(this.heading, this.amount, this.reason, send, cancel);
    this.node.addEventListener('submit', event => {
      event.preventDefault();
      void this.send();
    });
  }

  open(dataset: string): void {
    this.dataset = dataset;
    this.heading.textContent = `Ask your instructor for more ε on ${dataset}`;
    this.node.hidden = false;
    this.reason.focus();
  }

  close(): void {
    this.node.hidden = true;
    this.reason.value = '';
  }

  private async send(): Promise<void> {
    try {
      const asked = await this.api.call<BudgetRequestRow>('POST', 'requests', {
        dataset: this.dataset,
        epsilon: Number(this.amount.value),
        reason: this.reason.value
      });
      this.close();
      this.say(`request #${asked.id} sent: your instructor decides, and this panel shows the answer`, true);
      this.sent();
    } catch (err) {
      this.say(err instanceof ApiError ? err.message : String(err));
    }
  }
}

/** The student's own requests, newest first (rebuilt on every refresh). */
export function myRequests(rows: BudgetRequestRow[]): HTMLElement {
  const section = el('section', { 'aria-label': 'My budget requests' });
  section.append(el('h3', {}, 'My budget requests'));
  const list = el('ul', { class: 'lomas-sb-requests' });
  for (const r of rows.slice(0, 5)) {
    list.append(el('li', { class: `lomas-sb-request lomas-sb-request-${r.status}`, 'data-request': String(r.id) },
      requestLine(r)));
  }
  if (!rows.length) {
    list.append(el('li', {}, 'None yet: a gauge’s “Ask for more ε” asks your instructor.'));
  }
  section.append(list);
  return section;
}

/**
 * The admins' queue: each pending request with its reason; approve all (or the amount typed), optionally raising
 * the class cap, or decline with a note. The amount and note inputs start empty, so a periodic reload of the
 * admin view only pauses once the instructor starts typing.
 */
export function pendingRequests(
  api: LomasApi,
  rows: BudgetRequestRow[],
  act: (work: () => Promise<string>) => Promise<void>
): HTMLElement[] {
  const out: HTMLElement[] = [];
  for (const r of rows) {
    const box = el('div', { class: 'lomas-sb-form lomas-sb-pending', 'data-request': String(r.id) });
    const where = r.course ? ` (class ${r.course})` : '';
    box.append(
      el('p', { class: 'lomas-sb-who' }, `#${r.id}: ${r.username} asks for ε ${fmt(r.epsilon)} on ${r.dataset}${where}`),
      el('p', { class: 'lomas-sb-request-reason' }, `“${r.reason}”`)
    );
    const amount = el('input', {
      class: 'lomas-sb-input', type: 'number', min: '0', step: '0.1', placeholder: `ε ${fmt(r.epsilon)} (all)`,
      'aria-label': `ε to approve for request ${r.id}`
    });
    const note = el('input', { class: 'lomas-sb-input', placeholder: 'note to the student', maxlength: '500',
      'aria-label': `Note on request ${r.id}` });
    const raise = el('input', { type: 'checkbox', 'aria-label': `Raise the class cap if request ${r.id} needs it` });
    const raiseLabel = el('label', { class: 'lomas-sb-who' });
    raiseLabel.append(raise, document.createTextNode(' raise the class cap if needed'));
    const decide = (approve: boolean) => async (): Promise<string> => {
      const body: Record<string, unknown> = { decision: approve ? 'approve' : 'decline', note: note.value };
      if (approve && amount.value !== '') {
        body.epsilon = Number(amount.value);
      }
      if (approve && raise.checked) {
        body.raise_cap = true;
      }
      const done = await api.call<BudgetRequestRow>('POST', `admin/requests/${r.id}`, body);
      return approve
        ? `approved ε ${fmt(done.granted_epsilon ?? 0)} for ${r.username} on ${r.dataset}`
        : `declined request #${r.id} of ${r.username}`;
    };
    box.append(
      amount,
      note,
      r.course ? raiseLabel : el('span'),
      button('Approve', `Approve request ${r.id} of ${r.username}`, () => void act(decide(true))),
      button('Decline', `Decline request ${r.id} of ${r.username}`, () => void act(decide(false)))
    );
    out.push(box);
  }
  return out;
}
