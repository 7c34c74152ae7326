// Rate limits in the console (SPEC §2.9, docs/rate-limits.md): the push form's QoS section, the
// rule page's caps (edited with the hot update PUT rules/{id}) and limiter counters.
import { put, enc } from "../api.js";
import { add, h, clear, button } from "../dom.js";
import { showApiError, onSubmit } from "../forms.js";
import { capsEditor, capsSummary } from "../caps.js";
import { t } from "../i18n.js";
import { registerSlot } from "../registry.js";

const REJECT_REASONS = ["conn_concurrent", "conn_rate", "udp_flow_rate", "owner_concurrent", "owner_conn_rate",
  "owner_udp_flow_rate"];

registerSlot("rule.form", (root, { contribute, errorField }) => {
  const editor = capsEditor(null, { prefix: "qos" });
  const section = h("details.panel.qos#qos-section", h("summary", h("h3", t("qos.title"))), h("p.hint", t("qos.hint")), editor.el);
  add(root, section);
  contribute((b) => { const v = editor.value(); if (v) b.rate_limit = v; });
  errorField((code, err) => {
    const el = editor.inputFor(code, err);
    if (el) section.open = true;
    return el;
  });
});

function countersList(stats) {
  const rl = stats.rate_limit_stats;
  if (!rl) return null;
  const rejects = rl.rejects || {};
  const th = rl.throttle_seconds || {};
  const fact = (k, v) => [h("dt", k), h("dd", String(v))];
  return h("dl.facts#qos-counters",
    REJECT_REASONS.map((r) => fact(t("qos.rejects_reason", { reason: r }), rejects[r] ?? 0)),
    fact(t("qos.throttle_in"), `${Number(th.in || 0).toFixed(1)} s`),
    fact(t("qos.throttle_out"), `${Number(th.out || 0).toFixed(1)} s`),
    fact(t("qos.dropped"), `${rl.bandwidth_dropped_in ?? 0} / ${rl.bandwidth_dropped_out ?? 0}`));
}

registerSlot("rule.detail", (root, { rule, ctx, onStats }) => {
  let current = rule.rate_limit || null;
  const summary = h("p#qos-current");
  const counters = h("div#qos-counters-box");
  const formBox = h("div");
  const showSummary = () => add(clear(summary), t("qos.current"), " ", capsSummary(current));
  function drawForm() {
    const editor = capsEditor(current, { prefix: "edit" });
    const form = h("form.stack#qos-edit-form", { novalidate: true }, editor.el,
      h("div.actions", h("button.primary", { type: "submit" }, t("qos.save")),
        button(t("qos.remove_caps"), () => save(null), { class: "secondary", id: "qos-remove", disabled: !current })));
    async function save(value) {
      try {
        const res = await put(`rules/${enc(rule.rule_id)}`, { rate_limit: value });
        current = res.rate_limit || null;
        showSummary();
        ctx.flash(res.client_notified === false ? t("qos.saved_offline") : t("qos.saved"));
        drawForm();
      } catch (err) {
        showApiError(form, err, (code, e) => editor.inputFor(code, e));
      }
    }
    onSubmit(form, () => save(editor.value()));
    add(clear(formBox), form);
  }
  showSummary();
  drawForm();
  add(root, h("section.panel#qos-panel", h("h2", t("qos.rule_title")), h("p.hint", t("qos.hot_update_hint")), summary,
    h("details#qos-edit", h("summary", t("qos.edit")), formBox), counters));
  onStats((s) => {
    const list = countersList(s);
    if (list) add(clear(counters), h("h3", t("qos.counters")), list);
  });
  return undefined;
});
