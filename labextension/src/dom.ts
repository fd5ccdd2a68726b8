/** An element with attributes and text: the panel builds its DOM with this (no framework needed). */
export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  text = ''
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    node.setAttribute(key, value);
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

/** A panel button: visible text, an accessible name that says what it does, and its action. */
export function button(text: string, label: string, onClick: () => void): HTMLButtonElement {
  const node = el('button', { type: 'button', class: 'jp-Button lomas-sb-insert', 'aria-label': label }, text);
  node.addEventListener('click', onClick);
  return node;
}

/** Remember whether a details element is open, by key, so a rebuild of the panel keeps it as the user left it. */
export function keptOpen<K>(details: HTMLDetailsElement, opened: Set<K>, key: K): HTMLDetailsElement {
  details.open = opened.has(key);
  details.addEventListener('toggle', () => (details.open ? opened.add(key) : opened.delete(key)));
  return details;
}
