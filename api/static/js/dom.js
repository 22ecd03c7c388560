// Small DOM helpers. API data only ever reaches the page as text (textContent, attributes),
// never as HTML: with the strict CSP, that keeps the user's token out of any script's reach.

export const $ = (id) => document.getElementById(id);

/** An element with attributes (class, on<event> handlers, booleans) and children (text or nodes). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else if (value !== false && value !== null && value !== undefined) el.setAttribute(key, String(value));
  }
  for (const child of children) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return el;
}

export function setText(id, text) {
  $(id).textContent = text;
}

/** A message line: kind "error", "ok" or "" (neutral). */
export function say(id, text, kind = "") {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", kind === "error");
  el.classList.toggle("ok", kind === "ok");
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** 32 random hex digits (crypto.randomUUID needs a secure context; getRandomValues does not). */
export function randomId() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}
