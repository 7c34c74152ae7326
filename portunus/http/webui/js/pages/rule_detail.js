// Rule detail: live stats over the SSE stream (Streaming), falling back to polling (Polling)
// when the stream breaks; rates from counter deltas; per-port and per-target tables.
// EventSource sends the session cookie but cannot set headers: GETs need no CSRF header.
import { get, enc } from "../api.js";
import { add, h, clear, button, badge, table, fmtBytes, fmtRate, fmtTime, fmtPorts } from "../dom.js";
import { lineChart } from "../chart.js";
import { t } from "../i18n.js";
import { registerPage, renderSlots } from "../registry.js";
import { stateBadge, ruleBadges, targetText, removeRule } from "./rules.js";

const POLL_SECS = 2;
const STREAM_RETRY_SECS = 15;
const MAX_PORT_ROWS = 256;
const HISTORY = 90;

function statTile(label, id) {
  return h("div.tile", h("p.tile-label", label), h("p.tile-value", { id }, "–"));
}

function ruleSummary(rule) {
  const dl = h("dl.facts");
  const fact = (k, v) => add(dl, h("dt", k), h("dd", v));
  fact(t("common.state"), h("span", stateBadge(rule), rule.reason ? h("span.reason", " ", rule.reason) : null));
  fact(t("rule.protocol"), rule.protocol.toUpperCase());
  fact(t("rule.listen"), `${rule.listen_host || "0.0.0.0"}:${fmtPorts(rule.listen_port, rule.listen_port_end)}`);
  fact(t("rule.client"), rule.client_name || rule.client_id);
  fact(t("rule.owner"), rule.owner || "–");
  fact(t("rule.created"), fmtTime(rule.created_at));
  fact(t("rule.targets"), h("ul.plain", [...rule.targets].map((tg) =>
    h("li.mono", targetText(tg), h("small", ` · ${t("rule.priority")} ${tg.priority ?? "–"}`)))));
  fact(t("rule.badges"), h("span.badges", ruleBadges(rule)));
  fact(t("rule.rule_id"), h("span.mono", rule.rule_id));
  return dl;
}

registerPage({
  path: "/rules/:id", title: "rule.detail_title", navParent: "/rules",
  async render(root, params, ctx) {
    const rule = await get(`rules/${enc(params.id)}`);
    const mode = h("span.badge#stream-mode", { role: "status" }, t("live.connecting"));
    const udp = rule.protocol === "udp";
    const tiles = h("div.tiles",
      statTile(t("live.bytes_in"), "stat-bytes-in"), statTile(t("live.bytes_out"), "stat-bytes-out"),
      statTile(t("live.rate_in"), "stat-rate-in"), statTile(t("live.rate_out"), "stat-rate-out"),
      statTile(udp ? t("live.active_flows") : t("live.active_connections"), "stat-active"),
      udp ? statTile(t("live.datagrams"), "stat-datagrams") : statTile(t("live.failovers"), "stat-failovers"),
      statTile(t("live.dns_failures"), "stat-dns"), statTile(t("live.updated"), "stat-updated"));
    const chartBox = h("div.chart-holder");
    const perTarget = h("div#per-target");
    const perPort = h("div#per-port");
    const gone = h("p.notice#rule-gone", { hidden: true }, t("live.rule_gone"));
    const isRange = rule.listen_port_end && rule.listen_port_end !== rule.listen_port;
    add(root, 
      h("p.crumbs", h("a", { href: "/rules" }, t("nav.rules")), " / ", fmtPorts(rule.listen_port, rule.listen_port_end)),
      h("div.title-row", h("h1", t("rule.detail_heading", { port: fmtPorts(rule.listen_port, rule.listen_port_end) })),
        button(t("rule.remove"), async () => { if (await removeRule(rule, ctx)) ctx.navigate("/rules"); }, { class: "danger" })),
      h("section.panel", ruleSummary(rule)),
      h("section.panel", h("div.title-row", h("h2", t("live.title")), mode), gone, tiles, chartBox),
      h("section.panel", h("h2", t("live.per_target")), perTarget),
      isRange ? h("section.panel", h("h2", t("live.per_port")), perPort) : null);
    // slots follow the same stats the tiles show (SNI and rate-limit counters)
    const statsListeners = [];
    const slotCleanup = renderSlots("rule.detail", root, { rule, ctx, onStats: (fn) => statsListeners.push(fn) });

    let last = null;
    const rates = { in: [], out: [] };
    let source = null, pollTimer = null, retryTimer = null, stopped = false;
    const set = (id, v) => { const el = document.getElementById(id); if (el) el.textContent = v; };

    function update(s) {
      for (const fn of statsListeners) { try { fn(s); } catch (_) { /* one panel must not stop the tiles */ } }
      const at = s.updated_at ? Date.parse(s.updated_at) : null;
      if (last && at && last.at && at > last.at) {
        const dt = (at - last.at) / 1000;
        rates.in.push(Math.max(0, (s.bytes_in - last.bytes_in) / dt));
        rates.out.push(Math.max(0, (s.bytes_out - last.bytes_out) / dt));
        if (rates.in.length > HISTORY) { rates.in.shift(); rates.out.shift(); }
      }
      if (!last || at !== last.at) last = { at, bytes_in: s.bytes_in, bytes_out: s.bytes_out };
      set("stat-bytes-in", fmtBytes(s.bytes_in));
      set("stat-bytes-out", fmtBytes(s.bytes_out));
      set("stat-rate-in", fmtRate(rates.in.at(-1) ?? 0));
      set("stat-rate-out", fmtRate(rates.out.at(-1) ?? 0));
      set("stat-active", String(udp ? s.active_flows : s.active_connections));
      set("stat-datagrams", `${s.datagrams_in} / ${s.datagrams_out}`);
      set("stat-failovers", String(s.target_failovers_total));
      set("stat-dns", String(s.dns_failures));
      set("stat-updated", s.updated_at ? new Date(s.updated_at).toLocaleTimeString([], { hour12: false }) : t("live.no_report"));
      add(clear(chartBox), lineChart([
        { label: t("dash.in"), values: rates.in, className: "s-in" },
        { label: t("dash.out"), values: rates.out, className: "s-out" }], { formatY: fmtRate, minMax: 1024, title: t("live.title") }));
      const tcols = [t("live.target"), t("rule.priority"), t("live.health"), t("live.fails"), t("live.bytes_in"),
        t("live.bytes_out"), t("live.connections"), t("live.last_failure")];
      add(clear(perTarget), table(tcols, (s.per_target || []).map((tg) => [
        h("span.mono", targetText(tg)), String(tg.priority ?? "–"),
        badge(t(`health.${tg.health}`), tg.health === "healthy" ? "ok" : "bad"),
        String(tg.consecutive_failures ?? 0), fmtBytes(tg.bytes_in), fmtBytes(tg.bytes_out), String(tg.connections ?? 0),
        fmtTime(tg.last_failure_at)]), { caption: t("live.per_target"), empty: t("live.no_targets_yet") }));
      if (isRange) {
        const ports = (s.per_port || []).slice(0, MAX_PORT_ROWS);
        const pcols = [t("rule.listen"), t("live.bytes_in"), t("live.bytes_out"), udp ? t("live.datagrams") : t("live.active_connections")];
        add(clear(perPort), table(pcols, ports.map((p) => [String(p.listen_port), fmtBytes(p.bytes_in), fmtBytes(p.bytes_out),
          udp ? `${p.datagrams_in} / ${p.datagrams_out}` : String(p.active_connections)]), { caption: t("live.per_port") }),
        (s.per_port || []).length > MAX_PORT_ROWS ? h("p.hint", t("live.ports_truncated", { n: MAX_PORT_ROWS })) : null);
      }
    }

    function setMode(kind) {
      mode.textContent = t(`live.${kind}`);
      mode.className = `badge ${kind === "streaming" ? "ok" : kind === "polling" ? "warn" : ""}`;
      mode.dataset.mode = kind;
    }

    function startStream() {
      if (stopped) return;
      source = new EventSource(`/v1/rules/${enc(rule.rule_id)}/stats/stream`);
      source.addEventListener("stats", (e) => {
        setMode("streaming");
        stopPolling();
        try { update(JSON.parse(e.data)); } catch (_) { /* a malformed event is skipped */ }
      });
      source.onerror = () => { source.close(); source = null; startPolling(); };
    }

    async function pollOnce() {
      try {
        update(await get(`rules/${enc(rule.rule_id)}/stats?per_port=${isRange}&per_target=true`));
      } catch (err) {
        if (err.status === 404) { gone.hidden = false; stop(); setMode("stopped"); }
      }
    }

    function startPolling() {
      if (stopped) return;
      setMode("polling");
      if (!pollTimer) {
        pollOnce();
        pollTimer = setInterval(pollOnce, POLL_SECS * 1000);
      }
      clearTimeout(retryTimer);
      retryTimer = setTimeout(() => { if (!stopped && !source) startStream(); }, STREAM_RETRY_SECS * 1000);
    }

    function stopPolling() { clearInterval(pollTimer); pollTimer = null; clearTimeout(retryTimer); }

    function stop() { stopped = true; stopPolling(); if (source) source.close(); source = null; }

    startStream();
    return () => { stop(); slotCleanup(); };
  },
});
