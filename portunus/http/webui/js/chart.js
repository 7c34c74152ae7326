// A small hand-written SVG line chart: a few series over the same x axis, scaled to the max.
import { add, h } from "./dom.js";

const NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

// series: [{label, values: [number], className}]; formatY(number) -> axis text
export function lineChart(series, { width = 900, height = 220, formatY = String, title = "", minMax = 1 } = {}) {
  const pad = { left: 84, right: 8, top: 10, bottom: 10 };
  const n = Math.max(2, ...series.map((s) => s.values.length));
  const max = Math.max(minMax, ...series.flatMap((s) => s.values));
  const x = (i) => pad.left + (i * (width - pad.left - pad.right)) / (n - 1);
  const y = (v) => pad.top + (1 - v / max) * (height - pad.top - pad.bottom);
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img",
    "aria-label": title });
  for (const frac of [0, 0.5, 1]) {
    const yy = y(max * frac);
    add(root, svg("line", { x1: pad.left, x2: width - pad.right, y1: yy, y2: yy, class: "grid" }));
    const label = svg("text", { x: pad.left - 6, y: yy + 4, "text-anchor": "end", class: "axis" });
    label.textContent = formatY(max * frac);
    add(root, label);
  }
  for (const s of series) {
    if (!s.values.length) continue;
    const offset = n - s.values.length;
    const points = s.values.map((v, i) => `${x(i + offset).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    add(root, svg("polyline", { points, class: `line ${s.className || ""}`, fill: "none" }));
  }
  const legend = h("ul.legend", series.map((s) => h("li", h(`span.swatch.${s.className || ""}`), s.label)));
  return h("figure.chart-box", root, legend);
}
