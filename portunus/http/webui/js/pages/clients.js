// Clients: list with connected state, version, capabilities, address; enroll with a one-time
// command reveal (copy + expiry countdown), rename, address, re-enroll, revoke, delete, show revoked.
import { get, post, put, patch, del, enc } from "../api.js";
import { add, h, clear, field, input, button, badge, table, fmtTime, confirmDialog, formDialog, copyButton,
  setFieldError } from "../dom.js";
import { showApiError, byCode, onSubmit, errorText } from "../forms.js";
import { t } from "../i18n.js";
import { registerPage, renderSlots } from "../registry.js";

const REFRESH_SECS = 5;

function clientState(c) {
  if (c.revoked) return badge(t("client.revoked"), "bad");
  return c.connected ? badge(t("client.connected"), "ok") : badge(t("client.offline"), "warn");
}

// The one-time command: shown here once, kept only in this element, never stored or cached.
function revealBox(result, onClose) {
  const code = h("code.command#enroll-command", result.command);
  const countdown = h("span.countdown#enroll-countdown");
  const expires = Date.parse(result.expires_at);
  const box = h("section.reveal#enroll-reveal", { "aria-live": "polite" },
    h("h2", t("client.enroll_command_title", { name: result.client.client_name })),
    h("p.hint", t("client.enroll_command_hint")),
    h("div.command-row", code, copyButton(() => result.command)),
    h("p", countdown),
    button(t("common.hide"), () => { clearInterval(timer); box.remove(); onClose(); }));
  function tick() {
    const left = Math.round((expires - Date.now()) / 1000);
    if (left <= 0) {
      countdown.textContent = t("client.enroll_expired");
      box.classList.add("expired");
      clearInterval(timer);
      return;
    }
    const mm = Math.floor(left / 60), ss = String(left % 60).padStart(2, "0");
    countdown.textContent = t("client.enroll_expires_in", { time: `${mm}:${ss}` });
  }
  const timer = setInterval(tick, 1000);
  tick();
  box.stop = () => clearInterval(timer);
  return box;
}

function enrollForm(onResult) {
  const name = input({ required: true, autocomplete: "off", placeholder: "edge-01" });
  const ttl = input({ type: "number", min: 1, max: 1440, value: 10, inputmode: "numeric" });
  const form = h("form.inline-form#enroll-form", { novalidate: true },
    field(t("client.name"), name, { name: "name" }),
    field(t("client.ttl_minutes"), ttl, { name: "ttl" }),
    h("button.primary", { type: "submit" }, t("client.enroll")));
  onSubmit(form, async () => {
    if (!name.value.trim()) { setFieldError(name, t("client.name_required")); return; }
    try {
      const result = await post("client-enrollments", { name: name.value.trim(), ttl_secs: Math.round(Number(ttl.value) * 60) });
      name.value = "";
      onResult(result);
    } catch (err) {
      showApiError(form, err, byCode({ "validation.invalid_client_name": name, "validation.*ttl*": ttl,
        "validation.invalid_ttl": ttl, "endpoint_*": null }));
    }
  });
  return form;
}

registerPage({
  path: "/clients", title: "nav.clients", nav: true,
  async render(root, params, ctx) {
    const admin = ctx.isSuperadmin();
    const showRevoked = h("input#show-revoked", { type: "checkbox" });
    const listBox = h("div#clients-list");
    const revealHolder = h("div");
    let revealed = null;
    function reveal(result) {
      if (revealed) revealed.stop();
      revealed = revealBox(result, () => { revealed = null; });
      add(clear(revealHolder), revealed);
      revealed.querySelector("button.copy").focus();
      refresh();
    }
    add(root, h("h1", t("nav.clients")),
      admin ? h("section.panel", h("h2", t("client.enroll_title")), enrollForm(reveal)) : null,
      revealHolder,
      h("div.toolbar", h("label.check", showRevoked, " ", t("client.show_revoked"))),
      listBox);
    showRevoked.addEventListener("change", () => refresh());

    async function action(fn, okText) {
      try { const r = await fn(); if (okText) ctx.flash(okText); await refresh(); return r; } catch (err) {
        ctx.flash(errorText(err), "error");
        return null;
      }
    }

    function actions(c) {
      if (!admin) return "";
      const cell = h("div.row-actions");
      add(cell, button(t("client.rename"), () => formDialog(t("client.rename_title", { name: c.client_name }), (form) => {
        add(form, field(t("client.name"), input({ value: c.client_name, required: true }), { name: "name" }));
      }, async (form) => {
        const el = form.querySelector("input");
        try { await patch(`clients/${enc(c.client_id)}/name`, { name: el.value.trim() }); await refresh(); } catch (err) {
          showApiError(form, err, () => el); throw err;
        }
      })));
      add(cell, button(t("client.address"), () => formDialog(t("client.address_title", { name: c.client_name }), (form) => {
        add(form, field(t("client.address"), input({ value: c.address || "", placeholder: "203.0.113.7" }),
          { name: "address", hint: t("client.address_hint") }));
      }, async (form) => {
        const el = form.querySelector("input");
        try { await put(`clients/${enc(c.client_id)}`, { address: el.value.trim() || null }); await refresh(); } catch (err) {
          showApiError(form, err, () => el); throw err;
        }
      })));
      add(cell, button(t("client.reenroll"), async () => {
        const result = await action(() => post(`clients/${enc(c.client_id)}/enrollment`, {}));
        if (result) reveal(result);
      }));
      if (!c.revoked) {
        add(cell, button(t("client.revoke"), async () => {
          if (await confirmDialog(t("client.revoke_title", { name: c.client_name }), t("client.revoke_body"),
            { confirmLabel: t("client.revoke") })) {
            await action(() => post(`clients/${enc(c.client_id)}/revoke`), t("client.revoked_done", { name: c.client_name }));
          }
        }, { class: "danger" }));
      } else {
        add(cell, button(t("common.delete"), async () => {
          if (await confirmDialog(t("client.delete_title", { name: c.client_name }), t("client.delete_body"),
            { confirmLabel: t("common.delete") })) {
            await action(() => del(`clients/${enc(c.client_id)}`), t("client.deleted_done", { name: c.client_name }));
          }
        }, { class: "danger" }));
      }
      renderSlots("client.actions", cell, { client: c });
      return cell;
    }

    async function refresh() {
      const res = await get("clients");
      const all = res.clients || [];
      const shown = all.filter((c) => showRevoked.checked || !c.revoked);
      const cols = [t("client.name"), t("common.state"), t("client.version"), t("client.capabilities"),
        t("client.address"), admin ? t("common.actions") : ""];
      const rows = shown.map((c) => [
        h("span", h("strong", c.client_name), h("br"), h("small.mono", c.client_id)),
        clientState(c),
        c.client_version || "–",
        h("span.caps", (c.capabilities || []).map((cap) => badge(cap))),
        h("span", c.remote_addr || "–", c.address ? h("small", " · ", t("client.address_set"), " ", c.address) : null,
          c.connected_at ? h("small", h("br"), t("client.since", { time: fmtTime(c.connected_at) })) : null),
        actions(c)]);
      add(clear(listBox), table(cols, rows, { caption: t("nav.clients"),
        empty: all.length ? t("client.none_shown") : t("client.none") }));
      for (const [i, tr] of [...listBox.querySelectorAll("tbody tr")].entries()) tr.dataset.clientName = shown[i].client_name;
    }
    await refresh();
    const timer = setInterval(() => {
      if (!document.querySelector("dialog[open]")) refresh().catch(() => {});
    }, REFRESH_SECS * 1000);
    return () => { clearInterval(timer); if (revealed) revealed.stop(); };
  },
});
