// One client's page (superadmin): tabs for its owner caps (the envelope per owner, SPEC §2.9),
// its quotas (§2.10) and its traffic history. Reached from the Clients list.
import { get, put, del, enc } from "../api.js";
import { add, h, clear, button, table, confirmDialog, formDialog } from "../dom.js";
import { showApiError, errorText } from "../forms.js";
import { capsEditor, capsSummary } from "../caps.js";
import { t } from "../i18n.js";
import { registerPage, registerSlot } from "../registry.js";
import { quotasPanel } from "./quotas.js";
import { trafficChart } from "../traffic.js";

registerSlot("client.actions", (cell, { client }) => {
  add(cell, h("a.button", { href: `/clients/${enc(client.client_id)}` }, t("client.details")));
});

function ownerCapsTab(client, ctx) {
  const box = h("div#owner-caps");
  async function setCap(owner, current) {
    await formDialog(t("owner_cap.set_title", { owner: owner.owner_id, client: client.client_name }), (form) => {
      form.editor = capsEditor(current, { prefix: "owner" });
      add(form, h("p.hint", t("owner_cap.hint")), form.editor.el);
    }, async (form) => {
      try {
        await put(`clients/${enc(client.client_id)}/owners/${enc(owner.owner_id)}/rate-limit`, { rate_limit: form.editor.value() || {} });
      } catch (err) { showApiError(form, err, (code, e) => form.editor.inputFor(code, e)); throw err; }
      ctx.flash(t("owner_cap.saved", { owner: owner.owner_id }));
      await refresh();
    });
  }
  async function clearCap(owner) {
    if (!await confirmDialog(t("owner_cap.clear_title", { owner: owner.owner_id }), t("owner_cap.clear_body"),
      { confirmLabel: t("owner_cap.clear") })) return;
    try {
      await del(`clients/${enc(client.client_id)}/owners/${enc(owner.owner_id)}/rate-limit`);
      ctx.flash(t("owner_cap.cleared", { owner: owner.owner_id }));
    } catch (err) { ctx.flash(errorText(err), "error"); }
    await refresh();
  }
  async function refresh() {
    const owners = (await get(`clients/${enc(client.client_id)}/owners`)).owners || [];
    const caps = await Promise.all(owners.map((o) => (o.has_rate_limit
      ? get(`clients/${enc(client.client_id)}/owners/${enc(o.owner_id)}/rate-limit`).then((r) => r.rate_limit).catch(() => null)
      : Promise.resolve(null))));
    const cols = [t("rule.owner"), t("owner_cap.rules"), t("rule.caps"), t("common.actions")];
    add(clear(box), table(cols, owners.map((o, i) => [h("strong.mono", o.owner_id), String(o.rule_count), capsSummary(caps[i]),
      h("div.row-actions", button(t("owner_cap.set"), () => setCap(o, caps[i])),
        caps[i] ? button(t("owner_cap.clear"), () => clearCap(o), { class: "danger" }) : null)]),
    { caption: t("owner_cap.title"), empty: t("owner_cap.none") }));
    for (const [i, tr] of [...box.querySelectorAll("tbody tr")].entries()) tr.dataset.owner = owners[i].owner_id;
  }
  const panel = h("section.panel", h("h2", t("owner_cap.title")), h("p.hint", t("owner_cap.intro")), box);
  panel.refresh = refresh;
  return panel;
}

registerPage({
  path: "/clients/:id", title: "client.detail_title", navParent: "/clients", role: "superadmin",
  async render(root, params, ctx) {
    const clients = (await get("clients")).clients || [];
    const client = clients.find((c) => c.client_id === params.id || c.client_name === params.id);
    if (!client) throw new Error(t("client.not_found", { id: params.id }));
    const users = (await get("users")).users || [];
    const caps = ownerCapsTab(client, ctx);
    const quotas = quotasPanel({ by: "client", id: client.client_id, admin: true, ctx, users });
    const traffic = h("section.panel", h("h2", t("traffic.title")));
    const tabs = [["owner-caps", t("owner_cap.title"), caps], ["quotas", t("quota.title"), quotas], ["traffic", t("traffic.title"), traffic]];
    const bar = h("div.tabs", { role: "tablist" });
    let chart = null;
    function show(key) {
      for (const [k, , panel] of tabs) panel.hidden = k !== key;
      for (const b of bar.children) b.setAttribute("aria-selected", String(b.dataset.tab === key));
      if (key === "traffic" && !chart) { chart = trafficChart(`clients/${enc(client.client_id)}/traffic`, { id: "client-traffic" }); add(traffic, chart); }
    }
    for (const [k, label, panel] of tabs) {
      const b = button(label, () => show(k), { role: "tab", id: `tab-${k}`, "aria-controls": `panel-${k}`, dataset: { tab: k } });
      panel.id = `panel-${k}`;
      panel.setAttribute("role", "tabpanel");
      add(bar, b);
    }
    add(root, h("p.crumbs", h("a", { href: "/clients" }, t("nav.clients")), " / ", client.client_name),
      h("h1", client.client_name), h("p.mono.hint", client.client_id), bar, tabs.map(([, , p]) => p));
    await Promise.all([caps.refresh(), quotas.refresh()]);
    show(new URLSearchParams(location.search).get("tab") || "owner-caps");
    return undefined;
  },
});
