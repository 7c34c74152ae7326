// Rules: list with state/reason/protocol/listen/targets/badges, filters by client/owner/state,
// paged so 5 000 rules stay responsive (only one page is ever in the DOM); push form; remove.
import { get, del, enc } from "../api.js";
import { add, h, clear, input, select, button, badge, table, fmtPorts, confirmDialog, field } from "../dom.js";
import { errorText } from "../forms.js";
import { t } from "../i18n.js";
import { registerPage, renderSlots } from "../registry.js";
import { ruleForm } from "./rule_form.js";
import { capsSummary } from "../caps.js";

const PAGE_SIZE = 50;
const REFRESH_SECS = 10;

export function stateBadge(rule) {
  const kind = { active: "ok", pending: "warn", failed: "bad", removing: "warn" }[rule.state] || "";
  return badge(t(`state.${rule.state}`), kind);
}

// "client|host|port" of every TCP port where an SNI rule listens: a plain rule there is the port's fallback
export function sniPorts(rules) {
  const keys = new Set();
  for (const r of rules) if (r.sni_pattern) keys.add(portKey(r));
  return keys;
}
export function portKey(r) { return `${r.client_id}|${r.listen_host || "0.0.0.0"}|${r.listen_port}`; }

export function ruleBadges(rule, sniKeys = null) {
  const out = [];
  if (rule.listen_port_end && rule.listen_port_end !== rule.listen_port) out.push(badge(t("badge.range"), "info"));
  if (rule.protocol === "udp") out.push(badge("UDP", "info"));
  if ((rule.targets || []).length > 1) out.push(badge(t("badge.multi_target"), "info"));
  if ((rule.targets || []).some((tg) => tg.proxy_protocol)) out.push(badge("PROXY", "info"));
  if (rule.prefer_ipv6) out.push(badge("IPv6", "info"));
  if (rule.health_check_interval_secs) out.push(badge(t("badge.health", { n: rule.health_check_interval_secs }), "info"));
  if (rule.sni_pattern) out.push(badge(`SNI ${rule.sni_pattern}`, "info.sni"));
  else if (sniKeys && rule.protocol === "tcp" && sniKeys.has(portKey(rule))) out.push(badge(t("badge.sni_fallback"), "info.sni"));
  if (rule.rate_limit) out.push(badge(t("badge.rate_limited"), "info.qos"));
  return out;
}

export function targetText(tg) {
  const host = String(tg.host).includes(":") ? `[${tg.host}]` : tg.host;
  const port = tg.port_end && tg.port_end !== tg.port ? `${tg.port}-${tg.port_end}` : tg.port;
  return `${host}:${port}${tg.proxy_protocol ? " (" + tg.proxy_protocol + ")" : ""}`;
}

function targetsCell(rule) {
  const ts = [...(rule.targets || [])].sort((a, b) => (a.priority ?? 0) - (b.priority ?? 0));
  if (ts.length <= 1) return h("span.mono", ts.length ? targetText(ts[0]) : "–");
  return h("span.mono", targetText(ts[0]), h("small", ` +${ts.length - 1}`));
}

export async function removeRule(rule, ctx) {
  const ok = await confirmDialog(t("rule.remove_title", { port: fmtPorts(rule.listen_port, rule.listen_port_end) }),
    t("rule.remove_body", { client: rule.client_name || rule.client_id }), { confirmLabel: t("rule.remove") });
  if (!ok) return false;
  try {
    await del(`rules/${enc(rule.rule_id)}`);
    ctx.flash(t("rule.removed_done", { port: rule.listen_port }));
    return true;
  } catch (err) {
    ctx.flash(errorText(err), "error");
    return false;
  }
}

function filters(clients, onChange) {
  const client = select([["", t("filter.all_clients")], ...clients.map((c) => [c.client_id, c.client_name])]);
  const owner = input({ placeholder: t("filter.any_owner"), autocomplete: "off" });
  const state = select([["", t("filter.all_states")], ...["active", "pending", "failed", "removing"].map((s) => [s, t(`state.${s}`)])]);
  const text = input({ type: "search", placeholder: t("filter.search_placeholder"), autocomplete: "off" });
  for (const el of [client, owner, state, text]) el.addEventListener("input", onChange);
  return { client, owner, state, text };
}

registerPage({
  path: "/rules", title: "nav.rules", nav: true,
  async render(root, params, ctx) {
    const admin = ctx.isSuperadmin();
    const clientsRes = await get("clients");
    const clients = clientsRes.clients || [];
    let rules = [];
    let page = 0;
    const f = filters(clients, () => { page = 0; draw(); });
    const count = h("p.count#rules-count", { "aria-live": "polite" });
    const listBox = h("div#rules-list");
    const pager = h("nav.pager", { "aria-label": t("common.pages") });
    const form = ruleForm(clients, async (rule) => {
      ctx.flash(rule.state === "active" ? t("rule.pushed_active", { port: rule.listen_port })
        : t("rule.pushed_pending", { port: rule.listen_port }));
      await refresh();
    });
    const pushPanel = h("details.panel#push-panel", h("summary", h("h2", t("rule.push_title"))), form);
    if (new URLSearchParams(location.search).has("new")) pushPanel.open = true;
    add(root, h("div.title-row", h("h1", t("nav.rules")), button(t("common.refresh"), () => refresh(), { class: "secondary" })),
      pushPanel,
      h("div.toolbar.filters",
        field(t("filter.client"), f.client), admin ? field(t("filter.owner"), f.owner) : null,
        field(t("filter.state"), f.state), field(t("filter.search"), f.text)),
      count, listBox, pager);
    const slotCleanup = renderSlots("rules", root, {});

    function visible() {
      const q = f.text.value.trim().toLowerCase();
      const owner = f.owner.value.trim();
      return rules.filter((r) => (!f.client.value || r.client_id === f.client.value) &&
        (!owner || r.owner === owner) && (!f.state.value || r.state === f.state.value) &&
        (!q || `${r.listen_port} ${r.listen_port_end || ""} ${r.rule_id} ${r.client_name} ${r.reason || ""} ${(r.targets || []).map(targetText).join(" ")}`
          .toLowerCase().includes(q)));
    }

    function draw() {
      const started = performance.now();
      const shown = visible();
      const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
      page = Math.min(page, pages - 1);
      const slice = shown.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE);
      count.textContent = t("rule.count", { shown: shown.length, total: rules.length });
      const cols = [t("rule.listen"), t("common.state"), t("rule.protocol"), t("rule.targets"), t("rule.client"),
        t("rule.owner"), t("rule.caps"), t("rule.badges"), t("common.actions")];
      const sniKeys = sniPorts(rules);
      const rows = slice.map((r) => [
        h("a.mono", { href: `/rules/${enc(r.rule_id)}` }, (r.listen_host && r.listen_host !== "0.0.0.0" ? r.listen_host + ":" : "") + fmtPorts(r.listen_port, r.listen_port_end)),
        h("span", stateBadge(r), r.reason ? h("small.reason", " ", r.reason) : null),
        r.protocol.toUpperCase(), targetsCell(r), r.client_name || r.client_id, r.owner || "–",
        r.rate_limit ? capsSummary(r.rate_limit) : "–", h("span.badges", ruleBadges(r, sniKeys)),
        button(t("rule.remove"), async () => { if (await removeRule(r, ctx)) await refresh(); },
          { class: "danger small", "aria-label": t("rule.remove_aria", { port: r.listen_port }) })]);
      add(clear(listBox), table(cols, rows, { caption: t("nav.rules"), empty: t("rule.none") }));
      clear(pager);
      if (pages > 1) {
        add(pager, button(t("common.prev"), () => { page -= 1; draw(); }, { disabled: page === 0 }),
          h("span", t("common.page_of", { page: page + 1, pages })),
          button(t("common.next"), () => { page += 1; draw(); }, { disabled: page >= pages - 1 }));
      }
      performance.measure("portunus:rules-draw", { start: started, detail: shown.length });
    }

    async function refresh() {
      const res = await get("rules");
      rules = res.rules || [];
      rules.sort((a, b) => a.listen_port - b.listen_port || String(a.client_name).localeCompare(String(b.client_name)));
      draw();
    }
    await refresh();
    const timer = setInterval(() => {
      if (!document.querySelector("dialog[open]") && !form.contains(document.activeElement)) refresh().catch(() => {});
    }, REFRESH_SECS * 1000);
    return () => { clearInterval(timer); slotCleanup(); form.cleanup(); };
  },
});
