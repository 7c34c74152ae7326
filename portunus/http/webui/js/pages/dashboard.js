// Dashboard: clients connected / total, rules by state, live throughput and connections, alerts.
// For a tenant the same calls return only their own clients and rules (the server filters).
import { get, enc } from "../api.js";
import { add, h, clear, fmtRate, fmtBytes } from "../dom.js";
import { lineChart } from "../chart.js";
import { t } from "../i18n.js";
import { registerPage, renderSlots } from "../registry.js";

const SAMPLE_SECS = 3;
const MAX_SAMPLED_RULES = 40;  // stats are per rule; a dashboard must not fetch 5 000 of them
const HISTORY = 60;

function tile(label, value, sub, id) {
  return h("div.tile", { id }, h("p.tile-label", label), h("p.tile-value", value), sub ? h("p.tile-sub", sub) : null);
}

function ruleStateCounts(rules) {
  const counts = { active: 0, pending: 0, failed: 0, removing: 0 };
  for (const r of rules) counts[r.state] = (counts[r.state] || 0) + 1;
  return counts;
}

registerPage({
  path: "/", title: "nav.dashboard", nav: true,
  async render(root, params, ctx) {
    const [clientsRes, rulesRes] = await Promise.all([get("clients"), get("rules")]);
    const clients = clientsRes.clients || [];
    const rules = rulesRes.rules || [];
    const live = clients.filter((c) => !c.revoked);
    const connected = live.filter((c) => c.connected).length;
    const counts = ruleStateCounts(rules);
    const throughput = h("div.tile", { id: "tile-throughput" }, h("p.tile-label", t("dash.throughput")),
      h("p.tile-value", "…"));
    const conns = h("div.tile", { id: "tile-connections" }, h("p.tile-label", t("dash.active_connections")),
      h("p.tile-value", "…"));
    const chartBox = h("div.chart-holder");
    const alerts = h("ul.alerts", { id: "alerts" });
    add(root, h("h1", t("nav.dashboard")),
      h("div.tiles",
        tile(t("dash.clients_connected"), `${connected} / ${live.length}`, null, "tile-clients"),
        tile(t("dash.rules"), String(rules.length),
          ["active", "pending", "failed", "removing"].map((s) => `${t("state." + s)} ${counts[s] || 0}`).join(" · "),
          "tile-rules"),
        throughput, conns),
      h("section.panel", h("h2", t("dash.throughput_chart")), chartBox),
      h("section.panel", h("h2", t("dash.alerts")), alerts));
    const slotCleanup = renderSlots("dashboard", root, { clients, rules, admin: ctx.isSuperadmin() });

    const baseAlerts = [];
    for (const c of live) if (!c.connected) baseAlerts.push(h("li.alert.warn", t("dash.client_offline", { name: c.client_name })));
    for (const r of rules) {
      if (r.state === "failed") {
        baseAlerts.push(h("li.alert.bad", h("a", { href: `/rules/${enc(r.rule_id)}` },
          t("dash.rule_failed", { port: r.listen_port, client: r.client_name || r.client_id, reason: r.reason || "" }))));
      }
    }
    const sampled = rules.filter((r) => r.state === "active").slice(0, MAX_SAMPLED_RULES);
    const history = { in: [], out: [] };
    let previous = null;
    let timer = null;
    let stopped = false;

    async function sample() {
      const snapshots = await Promise.all(sampled.map((r) => {
        const multi = (r.targets || []).length > 1;
        return get(`rules/${enc(r.rule_id)}/stats${multi ? "?per_target=true" : ""}`).catch(() => null);
      }));
      if (stopped) return;
      const now = performance.now() / 1000;
      let bytesIn = 0, bytesOut = 0, active = 0;
      const unhealthy = [];
      snapshots.forEach((s, i) => {
        if (!s) return;
        bytesIn += s.bytes_in || 0;
        bytesOut += s.bytes_out || 0;
        active += (s.active_connections || 0) + (s.active_flows || 0);
        for (const tg of s.per_target || []) {
          if (tg.health === "failed") unhealthy.push(h("li.alert.warn", h("a", { href: `/rules/${enc(sampled[i].rule_id)}` },
            t("dash.target_unhealthy", { target: `${tg.host}:${tg.port}`, port: sampled[i].listen_port }))));
        }
      });
      if (previous) {
        const dt = Math.max(0.001, now - previous.at);
        history.in.push(Math.max(0, (bytesIn - previous.in) / dt));
        history.out.push(Math.max(0, (bytesOut - previous.out) / dt));
        if (history.in.length > HISTORY) { history.in.shift(); history.out.shift(); }
      }
      previous = { at: now, in: bytesIn, out: bytesOut };
      const rateIn = history.in.at(-1), rateOut = history.out.at(-1);
      throughput.querySelector(".tile-value").textContent =
        `↓ ${fmtRate(rateIn ?? 0)} · ↑ ${fmtRate(rateOut ?? 0)}`;
      throughput.title = t("dash.totals", { in: fmtBytes(bytesIn), out: fmtBytes(bytesOut) });
      conns.querySelector(".tile-value").textContent = String(active);
      add(clear(chartBox), lineChart([
        { label: t("dash.in"), values: history.in, className: "s-in" },
        { label: t("dash.out"), values: history.out, className: "s-out" }],
      { formatY: fmtRate, minMax: 1024, title: t("dash.throughput_chart") }),
      sampled.length < rules.filter((r) => r.state === "active").length
        ? h("p.hint", t("dash.sampled", { n: sampled.length })) : null);
      add(clear(alerts), ...baseAlerts, ...unhealthy);
      if (!alerts.children.length) add(alerts, h("li.alert.ok", t("dash.no_alerts")));
    }

    async function loop() {
      try { await sample(); } catch (_) { /* the next tick tries again */ }
      if (!stopped) timer = setTimeout(loop, SAMPLE_SECS * 1000);
    }
    loop();
    return () => { stopped = true; clearTimeout(timer); slotCleanup(); };
  },
});
