// TLS SNI routing in the console (SPEC §2.8, docs/sni.md): the push form's SNI field, and on the
// rule page the port's routes grouped with the SNI counters. The server decides every conflict;
// its codes land under the SNI field.
import { get, enc } from "../api.js";
import { add, h, clear, field, input, table } from "../dom.js";
import { t } from "../i18n.js";
import { registerSlot } from "../registry.js";
import { portKey, stateBadge, targetText } from "./rules.js";

const SNI_CODES = ["validation.sni_pattern_malformed", "validation.sni_on_unsupported_rule", "conflict.sni_route_duplicate",
  "conflict.sni_fallback_duplicate", "conflict.legacy_to_sni_unsupported", "sni_unsupported_by_client"];

registerSlot("rule.form", (root, { contribute, errorField, protocol, listen }) => {
  const sni = input({ autocomplete: "off", spellcheck: "false", placeholder: "a.example.com / *.example.com" });
  const note = h("p.hint#sni-disabled-note", { hidden: true }, t("sni.only_tcp_single"));
  const box = field(t("sni.pattern"), sni, { name: "sni_pattern", hint: t("sni.pattern_hint") });
  add(box, note);
  // SNI is for single-port TCP rules: say so, but keep the field, so the server's own refusal can be shown
  function applies() {
    const ok = protocol.value === "tcp" && !/-/.test(listen.value);
    note.hidden = ok || !sni.value.trim();
  }
  for (const el of [protocol, listen, sni]) el.addEventListener("input", applies);
  protocol.addEventListener("change", applies);
  add(root, h("div.grid2.sni-fields", box));
  contribute((b) => { const v = sni.value.trim(); if (v) b.sni_pattern = v; });
  errorField((code, err) => (SNI_CODES.includes(code) || /sni_pattern/.test(err.message || "") ? sni : null));
});

function routesTable(rule, siblings) {
  const rows = siblings.map((r) => [
    r.rule_id === rule.rule_id ? h("strong", r.sni_pattern || t("sni.fallback")) : h("a", { href: `/rules/${enc(r.rule_id)}` },
      r.sni_pattern || t("sni.fallback")),
    stateBadge(r), h("span.mono", (r.targets || []).map(targetText).join(", ")), r.owner || "–"]);
  return table([t("sni.pattern"), t("common.state"), t("rule.targets"), t("rule.owner")], rows, { caption: t("sni.routes_title") });
}

registerSlot("rule.detail", (root, { rule, onStats }) => {
  if (rule.protocol !== "tcp" || (rule.listen_port_end && rule.listen_port_end !== rule.listen_port)) return undefined;
  const routes = h("div#sni-routes");
  const counters = h("dl.facts#sni-counters");
  const panel = h("section.panel#sni-panel", { hidden: true },
    h("h2", t("sni.routes_title_port", { port: rule.listen_port })), h("p.hint", t("sni.routes_hint")), routes,
    h("h3", t("sni.counters")), counters);
  add(root, panel);
  get("rules").then((res) => {
    const key = portKey(rule);
    const siblings = (res.rules || []).filter((r) => r.protocol === "tcp" && portKey(r) === key)
      .sort((a, b) => (a.sni_pattern ? 0 : 1) - (b.sni_pattern ? 0 : 1) || String(a.sni_pattern).localeCompare(String(b.sni_pattern)));
    if (!siblings.some((r) => r.sni_pattern)) return;
    panel.hidden = false;
    add(clear(routes), routesTable(rule, siblings));
  }).catch(() => { /* the panel stays hidden; the rest of the page works */ });
  onStats((s) => {
    if (!s.sni_routes && !s.sni_listener) return;
    panel.hidden = false;
    const r = s.sni_routes || {};
    const l = s.sni_listener || {};
    const fact = (k, v) => [h("dt", k), h("dd", String(v ?? 0))];
    add(clear(counters),
      fact(t("sni.routed_exact"), r.exact), fact(t("sni.routed_wildcard"), r.wildcard), fact(t("sni.routed_fallback"), r.fallback),
      fact(t("sni.misses"), l.misses), fact(t("sni.parse_failures"), l.parse_failures),
      fact(t("sni.hello_timeouts"), l.hello_timeouts), fact(t("sni.reads_reset"), l.reads_reset),
      fact(t("sni.hellos_in_flight"), l.hellos_in_flight), fact(t("sni.routes_active"), l.routes_active));
  });
  return undefined;
});
