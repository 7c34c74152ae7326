// Metrics (superadmin): the /v1/metrics Prometheus text, with copy and refresh.
import { get } from "../api.js";
import { add, h, button, copyButton } from "../dom.js";
import { t } from "../i18n.js";
import { registerPage } from "../registry.js";

registerPage({
  path: "/metrics", title: "nav.metrics", nav: true, role: "superadmin",
  async render(root) {
    const pre = h("pre.metrics#metrics-text", { tabindex: "0", "aria-label": t("nav.metrics") });
    async function refresh() { pre.textContent = await get("metrics"); }
    add(root, h("div.title-row", h("h1", t("nav.metrics")),
      h("div.row-actions", copyButton(() => pre.textContent), button(t("common.refresh"), () => refresh(), { class: "secondary" }))),
    h("p.hint", t("metrics.hint")), pre);
    await refresh();
  },
});
