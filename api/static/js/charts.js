// Inline SVG charts drawn here, no library: a column per day, and horizontal bars per label.
// Each chart is an image with a text summary (aria-label) and a <title> per bar; bars carry
// data-key / data-value so what they show can be checked. Geometry uses floats; values do not.
// A chart is drawn at its container's width (one SVG unit = one CSS pixel), so its labels stay
// readable on a phone; the caller redraws it when the window is resized.

import { dayKey, tokens } from "./format.js";

const NS = "http://www.w3.org/2000/svg";

function svg(name, attrs = {}, text) {
  const el = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

const widthOf = (container) => Math.max(container.clientWidth || 600, 240);

function empty(container, text) {
  const p = document.createElement("p");
  p.className = "hint";
  p.textContent = text;
  container.replaceChildren(p);
}

/** Tokens per day for the `days` days up to `today` (UTC), zeros included. */
export function dayChart(container, perDay, { days = 30, today = new Date() } = {}) {
  const keys = Array.from({ length: days }, (_, i) => dayKey(today, i - days + 1));
  const values = keys.map((k) => perDay[k] || 0);
  const total = values.reduce((a, b) => a + b, 0);
  if (!total) return empty(container, `No usage in the last ${days} days.`);
  const max = Math.max(...values);
  const busiest = keys[values.indexOf(max)];
  const W = widthOf(container);
  const [H, left, bottom, top] = [Math.min(200, Math.max(140, W / 3)), 56, 22, 10];
  const plotW = W - left - 4;
  const plotH = H - bottom - top;
  const step = plotW / days;
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${H}`, role: "img", "data-total": total,
    "aria-label": `Tokens per day, last ${days} days: ${tokens(total)} in all; most on ${busiest}, ${tokens(max)}.`,
  });
  root.append(svg("line", { class: "axis", x1: left, y1: top + plotH, x2: W - 4, y2: top + plotH }));
  root.append(svg("text", { x: left - 6, y: top + 8, "text-anchor": "end", class: "muted" }, tokens(max)));
  root.append(svg("text", { x: left - 6, y: top + plotH, "text-anchor": "end", class: "muted" }, "0"));
  keys.forEach((key, i) => {
    const v = values[i];
    const height = v ? Math.max((v / max) * plotH, 1) : 0;
    const bar = svg("rect", { class: "bar", x: left + i * step + 1, y: top + plotH - height,
                              width: Math.max(step - 2, 1), height, "data-key": key, "data-value": v });
    bar.append(svg("title", {}, `${key}: ${tokens(v)} tokens`));
    root.append(bar);
  });
  for (const [i, anchor] of [[0, "start"], [Math.floor(days / 2), "middle"], [days - 1, "end"]]) {
    const x = anchor === "start" ? left + i * step : anchor === "end" ? left + (i + 1) * step : left + (i + .5) * step;
    root.append(svg("text", { x, y: H - 6, "text-anchor": anchor, class: "muted" }, keys[i].slice(5)));
  }
  container.replaceChildren(root);
}

/** Horizontal bars, largest first (at most `limit`; the rest summed as "others"). */
export function barList(container, counts, { what = "tokens", limit = 8 } = {}) {
  let entries = Object.entries(counts).filter(([, v]) => v > 0).sort((a, b) => b[1] - a[1]);
  if (!entries.length) return empty(container, "Nothing yet.");
  if (entries.length > limit) {
    const rest = entries.slice(limit - 1).reduce((a, [, v]) => a + v, 0);
    entries = [...entries.slice(0, limit - 1), ["others", rest]];
  }
  const max = entries[0][1];
  const W = widthOf(container);
  const [row, labelW, valueW] = [26, Math.min(120, W / 3), 64];
  const barW = W - labelW - valueW;
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${entries.length * row}`, role: "img",
    "aria-label": entries.map(([k, v]) => `${k}: ${tokens(v)} ${what}`).join("; "),
  });
  entries.forEach(([key, v], i) => {
    const y = i * row;
    const label = key.length > 16 ? key.slice(0, 15) + "…" : key;
    root.append(svg("text", { x: 0, y: y + 17 }, label));
    const bar = svg("rect", { class: "bar", x: labelW, y: y + 5, height: row - 10,
                              width: Math.max((v / max) * barW, 1), "data-key": key, "data-value": v });
    bar.append(svg("title", {}, `${key}: ${tokens(v)} ${what}`));
    root.append(bar);
    root.append(svg("text", { x: W, y: y + 17, "text-anchor": "end" }, tokens(v)));
  });
  container.replaceChildren(root);
}
