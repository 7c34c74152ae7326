// Traffic quotas in the console (SPEC §2.10, §4.4, docs/quotas.md): per-period progress bars,
// the EXHAUSTED banner with "Clear usage" / "Increase limit", setting a monthly limit in
// KB/MB/GB/TB, and the traffic chart. Users read their own ("My quotas"); the rest is superadmin.
import { get, put, patch, del, enc } from "../api.js";
import { add, h, clear, field, input, select, button, badge, table, fmtBytes, fmtTime, confirmDialog, formDialog } from "../dom.js";
import { showApiError, byCode, onSubmit, errorText } from "../forms.js";
import { t } from "../i18n.js";
import { registerPage, registerSlot } from "../registry.js";
import { trafficChart } from "../traffic.js";
import { withUnit } from "../caps.js";

export const SIZE_UNITS = [["1024", "KB"], ["1048576", "MB"], ["1073741824", "GB"], ["1099511627776", "TB"]];

// "4 GB" as an amount input and a unit select; value() -> bytes (an integer) or the text as typed
export function sizeInput(bytes, name) {
  const amount = input({ inputmode: "decimal", autocomplete: "off", required: true, placeholder: "500" });
  const unit = select(SIZE_UNITS, { "aria-label": t("quota.unit") });
  unit.value = "1073741824";
  if (bytes != null) {
    const fit = [...SIZE_UNITS].reverse().find(([u]) => bytes % Number(u) === 0 && bytes >= Number(u));
    if (fit) { unit.value = fit[0]; amount.value = String(bytes / Number(fit[0])); } else { unit.value = "1024"; amount.value = String(bytes / 1024); }
  }
  const f = withUnit(field(t("quota.monthly"), amount, { name, hint: t("quota.monthly_hint") }), unit);
  return { el: f, amount, unit, value() {
    const raw = amount.value.trim();
    const n = Number(raw) * Number(unit.value);
    return raw !== "" && Number.isFinite(n) ? Math.round(n) : raw;
  } };
}

function pct(q) {
  if (!q.monthly_bytes) return 100;
  return Math.min(100, Math.floor((q.current_period_bytes_used / q.monthly_bytes) * 1000) / 10);
}

function progress(q) {
  const p = pct(q);
  const bar = h("div.progress", { role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": p,
    "aria-label": t("quota.used_label") }, h("div.progress-fill", { dataset: { pct: String(Math.round(p)) } }));
  bar.firstChild.style.width = `${p}%`;
  if (q.exhausted) bar.classList.add("exhausted");
  return h("div.quota-usage", bar, h("span.quota-text", `${fmtBytes(q.current_period_bytes_used)} (${p}%)`,
    h("small", " ", t("quota.of", { limit: fmtBytes(q.monthly_bytes) })), q.exhausted ? " " : null,
    q.exhausted ? badge(t("quota.exhausted"), "bad") : null));
}

async function increaseLimit(q, onChange) {
  await formDialog(t("quota.increase_title", { user: q.user_id, client: q.client_name || q.client_id }), (form) => {
    const size = sizeInput(Math.max(q.monthly_bytes * 2, 1073741824), "increase_monthly");
    form.size = size;
    add(form, size.el);
  }, async (form) => {
    try { await patch(`users/${enc(q.user_id)}/quotas/${enc(q.client_id)}`, { monthly_bytes: form.size.value() }); } catch (err) {
      showApiError(form, err, () => form.size.amount); throw err;
    }
    await onChange(t("quota.increased"));
  }, { submitLabel: t("quota.increase") });
}

async function clearUsage(q, onChange) {
  try {
    await patch(`users/${enc(q.user_id)}/quotas/${enc(q.client_id)}`, { clear_period_usage: true });
    await onChange(t("quota.cleared"));
  } catch (err) { await onChange(errorText(err), "error"); }
}

function banner(q, admin, onChange) {
  return h("div.banner.bad.quota-banner", { role: "alert", dataset: { user: q.user_id, client: q.client_id } },
    h("p", h("strong", t("quota.exhausted")), " ", t("quota.banner", { user: q.user_id, client: q.client_name || q.client_id,
      time: fmtTime(q.exhausted_at) })),
    admin ? h("div.actions", button(t("quota.clear_usage"), () => clearUsage(q, onChange), { class: "secondary" }),
      button(t("quota.increase"), () => increaseLimit(q, onChange), { class: "primary" }))
      : h("p.hint", t("quota.banner_tenant")));
}

// The quota list of a user (by: "user") or a client (by: "client"), with the set form for superadmins.
export function quotasPanel({ by, id, admin, ctx, clients = [], users = [] }) {
  const banners = h("div.banners");
  const list = h("div.quota-list");
  const listPath = by === "user" ? `users/${enc(id)}/quotas` : `clients/${enc(id)}/quotas`;
  async function onChange(message, kind) { if (message) ctx.flash(message, kind); await refresh(); }

  function setForm() {
    const other = by === "user"
      ? select(clients.filter((c) => !c.revoked).map((c) => [c.client_id, c.client_name]), { required: true })
      : select(users.map((u) => [u.user_id, u.user_id]), { required: true });
    const size = sizeInput(null, "monthly_bytes");
    const form = h("form.inline-form.quota-form", { novalidate: true },
      field(by === "user" ? t("rule.client") : t("auth.user_id"), other, { name: "quota_target" }), size.el,
      h("button.primary", { type: "submit" }, t("quota.set")));
    onSubmit(form, async () => {
      const [u, c] = by === "user" ? [id, other.value] : [other.value, id];
      try {
        await put(`users/${enc(u)}/quotas/${enc(c)}`, { monthly_bytes: size.value() });
        await onChange(t("quota.set_done", { user: u }));
      } catch (err) {
        showApiError(form, err, byCode({ invalid_quota_size: size.amount, quota_target_not_found: other,
          quota_unsupported_by_client: other, "conflict.*": other }));
      }
    });
    return form;
  }

  async function refresh() {
    const quotas = (await get(listPath)).quotas || [];
    add(clear(banners), quotas.filter((q) => q.exhausted).map((q) => banner(q, admin, onChange)));
    const cols = [by === "user" ? t("rule.client") : t("auth.user_id"), t("quota.used"), t("quota.period"),
      admin ? t("common.actions") : ""];
    add(clear(list), table(cols, quotas.map((q) => [
      by === "user" ? q.client_name || q.client_id : h("span.mono", q.user_id), progress(q),
      h("small", t("quota.period_range", { start: fmtTime(q.current_period_started_at), end: fmtTime(q.current_period_ends_at) })),
      admin ? h("div.row-actions",
        button(t("quota.increase"), () => increaseLimit(q, onChange)),
        button(t("quota.clear_usage"), () => clearUsage(q, onChange)),
        button(t("quota.remove"), async () => {
          if (!await confirmDialog(t("quota.remove_title", { user: q.user_id, client: q.client_name || q.client_id }),
            t("quota.remove_body"), { confirmLabel: t("quota.remove") })) return;
          try { await del(`users/${enc(q.user_id)}/quotas/${enc(q.client_id)}`); await onChange(t("quota.removed")); } catch (err) {
            await onChange(errorText(err), "error");
          }
        }, { class: "danger" })) : ""]), { caption: t("quota.title"), empty: t("quota.none") }));
    for (const [i, tr] of [...list.querySelectorAll("tbody tr")].entries()) {
      tr.dataset.quotaUser = quotas[i].user_id;
      tr.dataset.quotaClient = quotas[i].client_name || quotas[i].client_id;
    }
  }
  const panel = h("section.panel.quotas", h("h2", t("quota.title")), banners, list,
    admin ? h("div", h("h3", t("quota.set_title")), setForm()) : null);
  panel.refresh = refresh;
  return panel;
}

async function userQuotasPage(root, userId, ctx, heading) {
  const admin = ctx.isSuperadmin();
  const clients = admin ? (await get("clients")).clients || [] : [];
  const panel = quotasPanel({ by: "user", id: userId, admin, ctx, clients });
  add(root, heading, panel,
    h("section.panel", h("h2", t("traffic.title")), trafficChart(`users/${enc(userId)}/traffic`, { id: "user-traffic" })));
  await panel.refresh();
  const timer = setInterval(() => { if (!document.querySelector("dialog[open]")) panel.refresh().catch(() => {}); }, 10000);
  return () => clearInterval(timer);
}

// every quota, client by client (there is no all-quotas route), and the global traffic
async function allQuotasPage(root, ctx) {
  const clients = ((await get("clients")).clients || []).filter((c) => !c.revoked);
  const users = (await get("users")).users || [];
  const panels = clients.map((c) => {
    const panel = quotasPanel({ by: "client", id: c.client_id, admin: true, ctx, users });
    panel.querySelector("h2").textContent = t("quota.on_client", { client: c.client_name });
    return panel;
  });
  add(root, h("h1", t("nav.quotas")), h("p.hint", t("quota.all_hint")), panels,
    clients.length ? null : h("p.empty", t("client.none")),
    h("section.panel", h("h2", t("traffic.global_title")), trafficChart("traffic/global", { id: "all-traffic" })));
  await Promise.all(panels.map((p) => p.refresh()));
  return undefined;
}

registerPage({
  path: "/quotas", title: "nav.quotas", nav: true,
  async render(root, params, ctx) {
    if (ctx.isSuperadmin()) return allQuotasPage(root, ctx);
    return userQuotasPage(root, ctx.session.user.user_id, ctx, h("h1", t("nav.my_quotas")));
  },
});

registerPage({
  path: "/users/:id/quotas", title: "quota.user_title", navParent: "/users", role: "superadmin",
  async render(root, params, ctx) {
    return userQuotasPage(root, params.id, ctx, [h("p.crumbs", h("a", { href: "/users" }, t("nav.users")), " / ", params.id),
      h("h1", t("quota.user_heading", { user: params.id }))]);
  },
});

// the dashboard's global traffic (GET traffic/global is superadmin only)
registerSlot("dashboard", (root, { admin }) => {
  if (!admin) return;
  add(root, h("section.panel#global-traffic", h("h2", t("traffic.global_title")), trafficChart("traffic/global", { id: "global-traffic-chart" })));
});
