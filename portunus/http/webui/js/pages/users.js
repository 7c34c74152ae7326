// Users (superadmin): create, disable/enable, reset password with a one-time reveal, delete with a
// preview of the rules it removes; per user, their grants (add / revoke with a preview).
import { get, post, patch, del, enc } from "../api.js";
import { add, h, clear, field, input, select, button, badge, table, fmtTime, fmtPorts, confirmDialog, copyButton,
  setFieldError } from "../dom.js";
import { showApiError, byCode, onSubmit, errorText } from "../forms.js";
import { t } from "../i18n.js";
import { registerPage, renderSlots } from "../registry.js";

function createUserForm(onCreated) {
  const userId = input({ required: true, autocomplete: "off", pattern: "[a-z][a-z0-9_-]{0,31}", spellcheck: "false" });
  const name = input({ autocomplete: "off" });
  const role = select([["user", t("role.user")], ["superadmin", t("role.superadmin")]]);
  const pw = input({ type: "password", autocomplete: "new-password", required: true });
  const form = h("form.inline-form#user-form", { novalidate: true },
    field(t("auth.user_id"), userId, { name: "user_id", hint: t("auth.user_id_hint") }),
    field(t("auth.display_name"), name, { name: "display_name" }),
    field(t("user.role"), role, { name: "role" }),
    field(t("auth.password"), pw, { name: "password", hint: t("auth.password_hint") }),
    h("button.primary", { type: "submit" }, t("user.create")));
  onSubmit(form, async () => {
    if (!userId.value.trim()) { setFieldError(userId, t("user.id_required")); return; }
    try {
      const user = await post("users", { user_id: userId.value.trim(), display_name: name.value.trim() || userId.value.trim(),
        role: role.value, password: pw.value });
      form.reset();
      onCreated(user && user.user ? user.user : user);
    } catch (err) {
      showApiError(form, err, byCode({ "validation.invalid_user_id": userId, "validation.reserved_user_id": userId,
        "conflict.user_exists": userId, "password_*": pw, "validation.invalid_password": pw, "validation.invalid_role": role }));
    }
  });
  return form;
}

function grantForm(user, clients, onAdded) {
  const client = select([["*", t("grant.any_client")], ...clients.filter((c) => !c.revoked).map((c) => [c.client_id, c.client_name])]);
  const start = input({ type: "number", min: 1, max: 65535, required: true, inputmode: "numeric" });
  const end = input({ type: "number", min: 1, max: 65535, inputmode: "numeric" });
  const tcp = h("input", { type: "checkbox", checked: true });
  const udp = h("input", { type: "checkbox" });
  const note = input({ autocomplete: "off" });
  const protoBox = h("fieldset.protocols", h("legend", t("grant.protocols")),
    h("label.check", tcp, " TCP"), h("label.check", udp, " UDP"));
  const form = h("form.inline-form.grant-form", { novalidate: true },
    field(t("grant.client"), client, { name: "client" }),
    field(t("grant.port_start"), start, { name: "listen_port_start" }),
    field(t("grant.port_end"), end, { name: "listen_port_end", hint: t("grant.port_end_hint") }),
    protoBox, field(t("grant.note"), note, { name: "note" }),
    h("button.primary", { type: "submit" }, t("grant.add")));
  onSubmit(form, async () => {
    const protocols = [tcp.checked && "tcp", udp.checked && "udp"].filter(Boolean);
    const body = { user_id: user.user_id, client: client.value, listen_port_start: Number(start.value),
      listen_port_end: Number(end.value || start.value), protocols };
    if (note.value.trim()) body.note = note.value.trim();
    try { await post("grants", body); form.reset(); tcp.checked = true; onAdded(); } catch (err) {
      showApiError(form, err, byCode({ "validation.grant_port_range_invalid": start, "validation.invalid_port": start,
        "validation.invalid_protocols": tcp, "validation.invalid_protocol": tcp, not_found: client }));
    }
  });
  return form;
}

function grantsPanel(user, clients, ctx) {
  const box = h("div.grants", { id: `grants-${user.user_id}` });
  const nameOf = (id) => (id === "*" ? t("grant.any_client") : (clients.find((c) => c.client_id === id) || {}).client_name || id);
  async function refresh() {
    const res = await get("grants");
    const grants = (res.grants || []).filter((g) => g.user_id === user.user_id);
    const cols = [t("grant.client"), t("grant.ports"), t("grant.protocols"), t("grant.note"), t("common.created"), t("common.actions")];
    add(clear(box), h("h3", t("grant.title", { user: user.user_id })),
      table(cols, grants.map((g) => [nameOf(g.client), fmtPorts(g.listen_port_start, g.listen_port_end),
        (g.protocols || []).join(", ").toUpperCase(), g.note || "–", fmtTime(g.created_at),
        button(t("grant.revoke"), () => revoke(g), { class: "danger small" })]), { caption: t("grant.title", { user: user.user_id }),
        empty: t("grant.none") }),
      grantForm(user, clients, refresh));
  }
  async function revoke(g) {
    const rules = ((await get(`rules?owner=${enc(user.user_id)}`)).rules || []).filter((r) =>
      (g.client === "*" || r.client_id === g.client) && r.listen_port >= g.listen_port_start && r.listen_port <= g.listen_port_end);
    const ok = await confirmDialog(t("grant.revoke_title"), h("div", h("p", t("grant.revoke_body", { n: rules.length })),
      rules.length ? h("ul.plain", rules.slice(0, 20).map((r) => h("li.mono", `${r.client_name}:${fmtPorts(r.listen_port, r.listen_port_end)}`))) : null),
    { confirmLabel: t("grant.revoke") });
    if (!ok) return;
    try {
      const res = await del(`grants/${enc(g.grant_id)}`);
      ctx.flash(t("grant.revoked_done", { n: (res && res.removed_rule_ids || []).length }));
      await refresh();
    } catch (err) { ctx.flash(errorText(err), "error"); }
  }
  box.refresh = refresh;
  return box;
}

registerPage({
  path: "/users", title: "nav.users", nav: true, role: "superadmin",
  async render(root, params, ctx) {
    const clients = (await get("clients")).clients || [];
    const listBox = h("div#users-list");
    const revealHolder = h("div");
    const grantsHolder = h("div");
    add(root, h("h1", t("nav.users")),
      h("section.panel", h("h2", t("user.create_title")), createUserForm(() => { ctx.flash(t("user.created")); refresh(); })),
      revealHolder, listBox, grantsHolder);
    const slotCleanup = renderSlots("users", root, {});

    async function act(fn, okText) {
      try { const r = await fn(); if (okText) ctx.flash(okText); await refresh(); return r; } catch (err) {
        ctx.flash(errorText(err), "error");
        return null;
      }
    }

    async function resetPassword(u) {
      if (!await confirmDialog(t("user.reset_title", { user: u.user_id }), t("user.reset_body"), { confirmLabel: t("user.reset") })) return;
      const res = await act(() => post(`users/${enc(u.user_id)}/password`, {}));
      if (!res) return;
      const secret = res.temporary_password || "";
      const box = h("section.reveal#password-reveal", h("h2", t("user.temp_password_title", { user: u.user_id })),
        h("p.hint", t("user.temp_password_hint", { n: res.sessions_revoked ?? 0 })),
        h("div.command-row", h("code.command", secret), copyButton(() => secret)),
        button(t("common.hide"), () => box.remove()));
      add(clear(revealHolder), box);
    }

    async function removeUser(u) {
      const rules = (await get(`rules?owner=${enc(u.user_id)}`)).rules || [];
      const body = h("div", h("p", t("user.delete_body", { n: rules.length })),
        rules.length ? h("ul.plain#delete-preview", rules.slice(0, 20).map((r) =>
          h("li.mono", `${r.client_name}:${fmtPorts(r.listen_port, r.listen_port_end)} → ${(r.targets[0] || {}).host}`))) : null,
        rules.length > 20 ? h("p.hint", t("user.delete_more", { n: rules.length - 20 })) : null);
      if (!await confirmDialog(t("user.delete_title", { user: u.user_id }), body, { confirmLabel: t("common.delete") })) return;
      const res = await act(() => del(`users/${enc(u.user_id)}`));
      if (res) ctx.flash(t("user.deleted_done", { user: u.user_id, n: (res.removed_rule_ids || []).length }));
    }

    function showGrants(u) {
      const panel = grantsPanel(u, clients, ctx);
      add(clear(grantsHolder), h("section.panel", panel));
      panel.refresh().then(() => panel.querySelector("h3").scrollIntoView({ block: "nearest" }));
    }

    async function refresh() {
      const users = (await get("users")).users || [];
      const me = ctx.session.user && ctx.session.user.user_id;
      const cols = [t("auth.user_id"), t("auth.display_name"), t("user.role"), t("common.state"), t("common.created"), t("common.actions")];
      add(clear(listBox), table(cols, users.map((u) => [
        h("strong.mono", u.user_id), u.display_name || "–", t(`role.${u.role}`),
        h("span", u.disabled ? badge(t("user.disabled"), "bad") : badge(t("user.enabled"), "ok"),
          u.password_change_required ? badge(t("user.must_change"), "warn") : null),
        fmtTime(u.created_at),
        h("div.row-actions",
          button(t("user.grants"), () => showGrants(u)),
          button(t("user.quotas"), () => ctx.navigate(`/users/${enc(u.user_id)}/quotas`)),
          u.user_id === me ? null : button(u.disabled ? t("user.enable") : t("user.disable"),
            () => act(() => patch(`users/${enc(u.user_id)}`, { disabled: !u.disabled }),
              u.disabled ? t("user.enabled_done", { user: u.user_id }) : t("user.disabled_done", { user: u.user_id }))),
          u.user_id === me ? null : button(t("user.reset"), () => resetPassword(u)),
          u.user_id === me ? null : button(t("common.delete"), () => removeUser(u), { class: "danger" }))]),
      { caption: t("nav.users") }));
    }
    await refresh();
    return slotCleanup;
  },
});
