// DOM helpers: elements are built from data, never from HTML strings, so server text can
// never become markup (no HTML-string APIs anywhere in the UI).
import { t } from "./i18n.js";

let uid = 0;
export function nextId(prefix = "f") { uid += 1; return `${prefix}-${uid}`; }

// h("tag.class#id", {attr: value, onclick: fn}, child, [children], "text")
export function h(spec, attrs, ...children) {
  const m = /^([a-z0-9]+)?((?:[.#][\w-]+)*)$/i.exec(spec) || [];
  const el = document.createElement(m[1] || "div");
  for (const part of (m[2] || "").match(/[.#][\w-]+/g) || []) {
    if (part[0] === ".") el.classList.add(part.slice(1)); else el.id = part.slice(1);
  }
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "value" || k === "checked" || k === "selected") el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// el.append that skips null/undefined/false (the DOM's own append would print "null")
export function add(el, ...children) { return append(el, children); }

export function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }

// A labelled form field. `input` is an element; the label is tied to it with for/id.
export function field(label, input, { hint, name } = {}) {
  if (!input.id) input.id = nextId("in");
  if (name) input.name = name;
  const err = h("p.field-error", { id: input.id + "-err", role: "alert", hidden: true });
  const hintEl = hint ? h("p.hint", { id: input.id + "-hint" }, hint) : null;
  input.setAttribute("aria-describedby", [hintEl && hintEl.id, err.id].filter(Boolean).join(" "));
  return h("div.field", { dataset: { field: name || "" } }, h("label", { for: input.id }, label), input, hintEl, err);
}

export function setFieldError(input, message) {
  const err = document.getElementById(input.id + "-err");
  if (!err) return;
  err.textContent = message || "";
  err.hidden = !message;
  if (message) input.setAttribute("aria-invalid", "true"); else input.removeAttribute("aria-invalid");
}

export function clearFieldErrors(form) {
  for (const el of form.querySelectorAll("[aria-invalid]")) setFieldError(el, "");
  for (const el of form.querySelectorAll(".form-error")) { el.textContent = ""; el.hidden = true; }
}

export function formError(form, message) {
  let el = form.querySelector(".form-error");
  if (!el) { el = h("p.form-error", { role: "alert" }); form.prepend(el); }
  el.textContent = message;
  el.hidden = !message;
}

export function input(attrs = {}) { return h("input", { type: "text", ...attrs }); }

export function select(options, attrs = {}) {
  return h("select", attrs, options.map(([value, label]) => h("option", { value }, label)));
}

export function button(label, onclick, attrs = {}) {
  return h("button", { type: "button", onclick, ...attrs }, label);
}

export function badge(text, kind = "") { return h(`span.badge${kind ? "." + kind : ""}`, text); }

// A table whose cells carry their column name, so narrow screens can show rows as cards.
export function table(columns, rows, { caption, empty } = {}) {
  const head = h("thead", h("tr", columns.map((c) => h("th", { scope: "col" }, c))));
  const body = h("tbody");
  for (const row of rows) body.append(tableRow(columns, row));
  const tbl = h("table.data", caption ? h("caption.sr-only", caption) : null, head, body);
  if (!rows.length && empty) return h("div", tbl, h("p.empty", empty));
  return tbl;
}

export function tableRow(columns, cells, attrs = {}) {
  return h("tr", attrs, cells.map((c, i) => h("td", { dataset: { label: columns[i] } }, c)));
}

// ---------------------------------------------------------------- formatting

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${i ? v.toFixed(v < 10 ? 2 : 1) : v} ${units[i]}`;
}

export function fmtRate(bytesPerSec) {
  if (bytesPerSec === null || bytesPerSec === undefined || !isFinite(bytesPerSec)) return "–";
  return `${fmtBytes(Math.max(0, Math.round(bytesPerSec)))}/s`;
}

export function fmtTime(value) {
  if (value === null || value === undefined || value === "") return "–";
  const d = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  if (isNaN(d.getTime())) return String(value);
  return d.toLocaleString();
}

export function fmtPorts(start, end) {
  return end && end !== start ? `${start}–${end}` : String(start);
}

// ---------------------------------------------------------------- dialogs and copy

// A modal confirmation; resolves true when the operator confirms.
export function confirmDialog(title, body, { confirmLabel, danger = true } = {}) {
  return new Promise((resolve) => {
    const ok = button(confirmLabel || t("common.confirm"), () => close(true), { class: danger ? "danger" : "primary" });
    const cancel = button(t("common.cancel"), () => close(false));
    const dlg = h("dialog.modal", { "aria-labelledby": nextId("dlg") },
      h("h2", title), h("div.dialog-body", body), h("div.actions", cancel, ok));
    dlg.querySelector("h2").id = dlg.getAttribute("aria-labelledby");
    function close(value) { dlg.close(); dlg.remove(); resolve(value); }
    dlg.addEventListener("cancel", (e) => { e.preventDefault(); close(false); });
    document.body.append(dlg);
    dlg.showModal();
    cancel.focus();
  });
}

// A modal with one form; `build(form)` adds fields, `submit(form)` returns a promise (throw to keep it open).
export function formDialog(title, build, submit, { submitLabel } = {}) {
  return new Promise((resolve) => {
    const form = h("form.stack", { novalidate: true });
    build(form);
    const cancel = button(t("common.cancel"), () => close(null));
    const ok = h("button.primary", { type: "submit" }, submitLabel || t("common.save"));
    form.append(h("div.actions", cancel, ok));
    const dlg = h("dialog.modal", h("h2", title), form);
    function close(value) { dlg.close(); dlg.remove(); resolve(value); }
    dlg.addEventListener("cancel", (e) => { e.preventDefault(); close(null); });
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      ok.disabled = true;
      try { close(await submit(form)); } catch (_) { /* the submitter showed the error inline */ } finally { ok.disabled = false; }
    });
    document.body.append(dlg);
    dlg.showModal();
    const first = form.querySelector("input,select,textarea");
    if (first) first.focus();
  });
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch (_) {
    // plain-http origins other than localhost have no clipboard API: fall back to a selection copy
    const ta = h("textarea.sr-only", { readonly: true }, text);
    document.body.append(ta);
    ta.select();
    const ok = document.execCommand && document.execCommand("copy");
    ta.remove();
    return !!ok;
  }
}

export function copyButton(getText) {
  const btn = button(t("common.copy"), async () => {
    const ok = await copyText(getText());
    btn.textContent = ok ? t("common.copied") : t("common.copy_failed");
    setTimeout(() => { btn.textContent = t("common.copy"); }, 2000);
  }, { class: "copy" });
  return btn;
}

export function downloadText(filename, text, type = "application/x-ndjson") {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = h("a", { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
