// The push form: single / multi-target with priorities / range / UDP / PROXY v1/v2 / prefer IPv6 /
// health checks. The server validates (one place, §2); its errors land on the field they concern.
import { post } from "../api.js";
import { add, h, field, input, select, button, setFieldError, formError } from "../dom.js";
import { showApiError, onSubmit } from "../forms.js";
import { t } from "../i18n.js";
import { renderSlots } from "../registry.js";

const MAX_TARGETS = 8;

function targetRow(index, onRemove) {
  const host = input({ required: true, autocomplete: "off", placeholder: "10.0.0.5", spellcheck: "false" });
  const port = input({ required: true, autocomplete: "off", placeholder: "8080", inputmode: "numeric" });
  const priority = input({ type: "number", min: 0, placeholder: String(index + 1), inputmode: "numeric" });
  const proxy = select([["", t("rule.proxy_none")], ["v1", "PROXY v1"], ["v2", "PROXY v2"]]);
  const row = h("fieldset.target-row", h("legend", t("rule.target_n", { n: index + 1 })),
    field(t("rule.target_host"), host, { name: `target_host_${index}` }),
    field(t("rule.target_port"), port, { name: `target_port_${index}`, hint: t("rule.target_port_hint") }),
    field(t("rule.priority"), priority, { name: `target_priority_${index}` }),
    field(t("rule.proxy_protocol"), proxy, { name: `target_proxy_${index}` }),
    index > 0 ? button(t("rule.remove_target"), onRemove, { class: "link" }) : null);
  row.inputs = { host, port, priority, proxy };
  return row;
}

function hostPort(host, port) {
  return host.includes(":") && !host.startsWith("[") ? `[${host}]:${port}` : `${host}:${port}`;
}

// clients: [client]; onPushed(rule, status) after a 201/202
export function ruleForm(clients, onPushed) {
  const client = select(clients.filter((c) => !c.revoked).map((c) =>
    [c.client_id, `${c.client_name}${c.connected ? "" : " (" + t("client.offline") + ")"}`]), { required: true });
  const protocol = select([["tcp", "TCP"], ["udp", "UDP"]]);
  const listen = input({ required: true, autocomplete: "off", placeholder: "8080 / 30000-30099", spellcheck: "false" });
  const listenHost = input({ autocomplete: "off", placeholder: "0.0.0.0", spellcheck: "false" });
  const preferV6 = h("input", { type: "checkbox" });
  const health = input({ type: "number", min: 1, max: 3600, placeholder: "30", inputmode: "numeric" });
  const targetsBox = h("div.targets");
  const rows = [];
  const addBtn = button(t("rule.add_target"), () => addRow(), { class: "secondary" });
  function renumber() {
    rows.forEach((r, i) => { r.querySelector("legend").textContent = t("rule.target_n", { n: i + 1 }); });
    addBtn.disabled = rows.length >= MAX_TARGETS;
  }
  function addRow() {
    const row = targetRow(rows.length, () => { rows.splice(rows.indexOf(row), 1); row.remove(); renumber(); });
    rows.push(row);
    add(targetsBox, row);
    renumber();
    if (rows.length > 1) row.inputs.host.focus();
  }
  addRow();
  const extras = h("div.form-extras");
  const contributors = [];
  const errorFields = [];
  // slots see the protocol and listen inputs: SNI applies to single-port TCP rules only
  const slotCleanup = renderSlots("rule.form", extras, { contribute: (fn) => contributors.push(fn),
    errorField: (fn) => errorFields.push(fn), protocol, listen });
  const form = h("form.stack#rule-form", { novalidate: true },
    h("div.grid2",
      field(t("rule.client"), client, { name: "client" }),
      field(t("rule.protocol"), protocol, { name: "protocol" }),
      field(t("rule.listen"), listen, { name: "listen", hint: t("rule.listen_hint") }),
      field(t("rule.listen_host"), listenHost, { name: "listen_host", hint: t("rule.listen_host_hint") })),
    h("h3", t("rule.targets")), h("p.hint", t("rule.targets_hint")), targetsBox, addBtn,
    h("div.grid2",
      h("div.field", h("label.check", preferV6, " ", t("rule.prefer_ipv6"))),
      field(t("rule.health_interval"), health, { name: "health_check_interval_secs", hint: t("rule.health_hint") })),
    extras,
    h("button.primary", { type: "submit" }, t("rule.push")));
  preferV6.id = "rule-prefer-ipv6";

  function body() {
    const b = { client: client.value, protocol: protocol.value, listen: listen.value.trim() };
    if (listenHost.value.trim()) b.listen_host = listenHost.value.trim();
    if (preferV6.checked) b.prefer_ipv6 = true;
    if (health.value.trim()) b.health_check_interval_secs = Number(health.value);
    const ts = rows.map((r) => r.inputs);
    const simple = ts.length === 1 && !ts[0].priority.value.trim() && !ts[0].proxy.value;
    if (simple) {
      b.target = hostPort(ts[0].host.value.trim(), ts[0].port.value.trim());
    } else {
      b.targets = ts.map((x, i) => {
        const port = x.port.value.trim();
        const entry = { host: x.host.value.trim(), port: /^\d+$/.test(port) ? Number(port) : port };
        entry.priority = x.priority.value.trim() ? Number(x.priority.value) : i + 1;
        if (x.proxy.value) entry.proxy_protocol = x.proxy.value;
        return entry;
      });
    }
    contributors.forEach((fn) => fn(b));
    return b;
  }

  // the server's codes are shared by several fields; its message names the field ("targets[1] port …")
  function fieldFor(code, err) {
    for (const fn of errorFields) { const el = fn(code, err); if (el) return el; }
    const msg = err.message || "";
    const part = { host: "host", port: "port", port_end: "port", priority: "priority", proxy_protocol: "proxy" };
    let m = /^targets\[(\d+)\](?: (host|port_end|port|priority|proxy_protocol))?/.exec(msg);
    if (m) return (rows[Number(m[1])] || rows[0]).inputs[part[m[2] || "host"]];
    m = /^target (host|port)/.exec(msg);
    if (m) return rows[0].inputs[m[1]];
    if (/^listen[_ ]host/.test(msg) || code === "validation.invalid_listen_host") return listenHost;
    if (code === "validation.port_range_width_mismatch" || code === "port_range_unsupported_by_client") return rows[0].inputs.port;
    if (/^listen/.test(msg) || ["port_in_use", "activation_failed", "port_outside_grant"].includes(code)) return listen;
    if (msg.includes("health_check") || code.startsWith("validation.health_check")) return health;
    if (msg.includes("proxy_protocol") || code === "proxy_protocol_unsupported_by_client") {
      return (rows.find((r) => r.inputs.proxy.value) || rows[0]).inputs.proxy;
    }
    if (msg.includes("prefer_ipv6")) return preferV6;
    if (["validation.invalid_protocol", "protocol_not_granted", "unsupported_protocol"].includes(code)) return protocol;
    if (["validation.invalid_target", "validation.too_many_targets", "multi_target_unsupported_by_client"].includes(code)) {
      return rows[0].inputs.host;
    }
    if (["client_not_connected", "client_not_granted", "not_found", "validation.missing_client", "not_owner",
      "conflict.client_revoked"].includes(code) || code.endsWith("_unsupported_by_client")) return client;
    return null;
  }

  onSubmit(form, async () => {
    let missing = false;
    if (!client.value) { setFieldError(client, t("rule.client_required")); missing = true; }
    if (!listen.value.trim()) { setFieldError(listen, t("rule.listen_required")); missing = true; }
    for (const r of rows) {
      if (!r.inputs.host.value.trim()) { setFieldError(r.inputs.host, t("rule.host_required")); missing = true; }
      if (!r.inputs.port.value.trim()) { setFieldError(r.inputs.port, t("rule.port_required")); missing = true; }
    }
    if (missing) { formError(form, t("rule.fix_fields")); return; }
    try {
      const rule = await post("rules", body());
      onPushed(rule);
    } catch (err) {
      showApiError(form, err, fieldFor);
    }
  });
  form.cleanup = slotCleanup;
  return form;
}
