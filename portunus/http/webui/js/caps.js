// Rate-limit caps (SPEC §2.9): the CAPS text the CLI prints, the burst range, and the one
// caps editor the push form, the rule page and the owner-caps tab share. The server validates;
// this only turns "10 MB/s" into bytes and shows the valid burst range as a hint.
import { h, field, input, select } from "./dom.js";
import { t } from "./i18n.js";

export const BANDWIDTH_UNITS = [["1", "B/s"], ["1000", "KB/s"], ["1000000", "MB/s"], ["1000000000", "GB/s"],
  ["125000", "Mbit/s"]];
const CAPS = ["bandwidth_in_bps", "bandwidth_out_bps", "new_connections_per_sec", "concurrent_connections"];
const BURSTS = [["bandwidth_in_burst", "bandwidth_in_bps"], ["bandwidth_out_burst", "bandwidth_out_bps"],
  ["new_connections_burst", "new_connections_per_sec"]];
const BYTE_FIELDS = new Set(["bandwidth_in_bps", "bandwidth_out_bps", "bandwidth_in_burst", "bandwidth_out_burst"]);
// literal keys, so the i18n test sees every one
const LABELS = {
  bandwidth_in_bps: () => t("qos.bandwidth_in_bps"), bandwidth_out_bps: () => t("qos.bandwidth_out_bps"),
  new_connections_per_sec: () => t("qos.new_connections_per_sec"), concurrent_connections: () => t("qos.concurrent_connections"),
  bandwidth_in_burst: () => t("qos.bandwidth_in_burst"), bandwidth_out_burst: () => t("qos.bandwidth_out_burst"),
  new_connections_burst: () => t("qos.new_connections_burst"),
};
const HINTS = {
  bandwidth_in_bps: () => t("qos.bandwidth_in_hint"), bandwidth_out_bps: () => t("qos.bandwidth_out_hint"),
  new_connections_per_sec: () => t("qos.new_connections_hint"), concurrent_connections: () => t("qos.concurrent_hint"),
};

// the same short decimal form as cli/units.format_quantity: 999, 1.0K, 512K, 1.5G
export function shortQuantity(n) {
  if (n < 1000) return String(n);
  let v = n;
  for (const prefix of "KMGTPE") {
    v /= 1000;
    const short = v < 9.95 ? (Math.round(v * 10) / 10).toFixed(1) : String(Math.round(v));
    if (Number(short) < 1000 || prefix === "E") return `${short}${prefix}`;
  }
  return String(n);
}

// `↓1.0M ↑512K 100/s ≤1000`, "" when uncapped (cli/units.caps_text, without its "-")
export function capsText(rl) {
  if (!rl) return "";
  const parts = [];
  if (rl.bandwidth_in_bps != null) parts.push(`↓${shortQuantity(rl.bandwidth_in_bps)}`);
  if (rl.bandwidth_out_bps != null) parts.push(`↑${shortQuantity(rl.bandwidth_out_bps)}`);
  if (rl.new_connections_per_sec != null) parts.push(`${rl.new_connections_per_sec}/s`);
  if (rl.concurrent_connections != null) parts.push(`≤${rl.concurrent_connections}`);
  return parts.join(" ");
}

// model.burst_bounds: [max(1, ceil(rate/100)), rate*60]
export function burstBounds(rate) { return [Math.max(1, Math.ceil(rate / 100)), rate * 60]; }

function amountInput(name, value, unit) {
  const el = input({ autocomplete: "off", inputmode: "decimal", placeholder: t("qos.uncapped"), spellcheck: "false" });
  el.dataset.cap = name;
  if (value != null && unit && !unit.dataset.chosen) {
    // the largest unit that shows the value whole: 512000 → 512 KB/s
    const fit = ["1000000000", "1000000", "1000"].find((u) => value % Number(u) === 0);
    unit.value = fit || "1";
    unit.dataset.chosen = "1";
  }
  if (value != null) el.value = unit ? String(value / Number(unit.value)) : String(value);
  return el;
}

// the unit select sits beside its amount, inside the same labelled field
export function withUnit(fieldEl, unit) {
  const amount = fieldEl.querySelector("input");
  const row = h("div.with-unit");
  amount.replaceWith(row);
  row.append(amount, unit);
  return fieldEl;
}

// A caps editor. `initial` is a rate_limit or null; `prefix` keeps field names unique per page.
// Returns {el, value() -> rate_limit | null, inputFor(code, err)}.
export function capsEditor(initial, { prefix = "qos" } = {}) {
  const rl = initial || {};
  const inputs = {};
  const units = {};
  const rows = [];
  for (const name of CAPS) {
    const bytes = BYTE_FIELDS.has(name);
    const unit = bytes ? select(BANDWIDTH_UNITS, { "aria-label": t("qos.unit") }) : null;
    if (unit) unit.value = "1";
    inputs[name] = amountInput(name, rl[name], unit);
    units[name] = unit;
    const f = field(LABELS[name](), inputs[name], { name: `${prefix}_${name}`, hint: HINTS[name]() });
    if (unit) withUnit(f, unit);
    rows.push(f);
  }
  const burstRows = [];
  for (const [name, rate] of BURSTS) {
    // a byte burst is typed in bytes: its rate's unit is for the rate only
    inputs[name] = amountInput(name, rl[name], null);
    units[name] = null;
    const hint = h("p.hint.burst-range", { dataset: { burstFor: name } });
    const f = field(LABELS[name](), inputs[name], { name: `${prefix}_${name}` });
    f.querySelector("label").after(hint);
    burstRows.push(f);
  }
  const advanced = h("details.advanced", h("summary", t("qos.advanced")), h("p.hint", t("qos.advanced_hint")),
    h("div.grid3", burstRows));
  if (BURSTS.some(([b]) => rl[b] != null)) advanced.open = true;

  function number(name) {
    const raw = inputs[name].value.trim();
    if (!raw) return null;
    const n = Number(raw) * (units[name] ? Number(units[name].value) : 1);
    return Number.isFinite(n) ? Math.round(n) : NaN;
  }
  function refreshRanges() {
    for (const [name, rate] of BURSTS) {
      const hint = advanced.querySelector(`[data-burst-for="${name}"]`);
      const r = number(rate);
      const unit = BYTE_FIELDS.has(rate) ? " B" : "";
      hint.textContent = r && r > 0 ? t("qos.burst_range", { lo: `${burstBounds(r)[0]}${unit}`, hi: `${burstBounds(r)[1]}${unit}` })
        : t("qos.burst_needs_rate");
    }
  }
  for (const el of [...Object.values(inputs), ...Object.values(units)]) if (el) el.addEventListener("input", refreshRanges);
  refreshRanges();
  const el = h("div.caps-editor", h("div.grid2", rows), advanced);
  return {
    el,
    value() {
      const out = {};
      for (const name of Object.keys(inputs)) {
        const v = number(name);
        if (v === null) continue;
        // not a number: sent as typed, so the server's rate_limit_invalid names it under its field
        out[name] = Number.isNaN(v) ? inputs[name].value.trim() : v;
      }
      return Object.keys(out).length ? out : null;
    },
    // the server's message names the field ("rate_limit.bandwidth_in_burst must be …")
    inputFor(code, err) {
      // an old client's refusal is about the client, not a cap: the caller places it
      if (!String(code).includes("rate_limit") || code === "rate_limit_unsupported_by_client") return null;
      const msg = (err && err.message) || "";
      // the first cap the message names is the bad one ("… for new_connections_per_sec=100" comes after)
      const found = Object.keys(inputs).map((n) => [msg.indexOf(n), n]).filter(([i]) => i >= 0).sort((a, b) => a[0] - b[0]);
      const hit = found.length ? found[0][1] : null;
      if (hit && BURSTS.some(([b]) => b === hit)) advanced.open = true;
      return inputs[hit || "bandwidth_in_bps"];
    },
    inputs,
  };
}

export function capsSummary(rl) {
  const text = capsText(rl);
  return text ? h("span.mono.caps-text", text) : h("span.muted", t("qos.uncapped"));
}
