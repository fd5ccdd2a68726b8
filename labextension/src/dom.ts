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
