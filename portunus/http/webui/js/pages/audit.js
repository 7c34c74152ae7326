// Audit (superadmin): newest first, live auto-refresh of the newest rows, "load earlier" with the
// cursor, outcome filter, NDJSON download of what is loaded.
import { get } from "../api.js";
import { add, h, clear, select, field, button, badge, table, fmtTime, downloadText } from "../dom.js";
import { errorText } from "../forms.js";
import { t } from "../i18n.js";
import { registerPage } from "../registry.js";

const PAGE = 100;
const LIVE_SECS = 5;
const EPOCH = "1970-01-01T00:00:00Z";  // any since= selects the envelope form with next_cursor

registerPage({
  path: "/audit", title: "nav.audit", nav: true, role: "superadmin",
  async render(root, params, ctx) {
    const outcome = select([["", t("audit.all")], ["allow", t("audit.allow")], ["deny", t("audit.deny")]]);
    const live = h("input#audit-live", { type: "checkbox", checked: true });
    const listBox = h("div#audit-list");
    const more = button(t("audit.load_earlier"), () => loadEarlier(), { class: "secondary", id: "audit-earlier" });
    const count = h("p.count#audit-count", { "aria-live": "polite" });
    let entries = [];
    let cursor = null;
    add(root, h("div.title-row", h("h1", t("nav.audit")),
      button(t("audit.download"), () => downloadText(`portunus-audit-${new Date().toISOString().slice(0, 19)}.ndjson`,
        entries.map((e) => JSON.stringify(e)).join("\n") + (entries.length ? "\n" : "")), { class: "secondary", id: "audit-download" })),
    h("div.toolbar", field(t("audit.outcome"), outcome), h("label.check", live, " ", t("audit.live"))),
    count, listBox, more);

    const query = (extra) => `audit?since=${EPOCH}&limit=${PAGE}${outcome.value ? "&outcome=" + outcome.value : ""}${extra}`;

    function draw() {
      const cols = [t("audit.time"), t("audit.actor"), t("audit.method"), t("audit.path"), t("audit.outcome"), t("audit.reason")];
      add(clear(listBox), table(cols, entries.map((e) => [fmtTime(e.timestamp), e.actor, e.method, h("span.mono.wrap", e.path),
        badge(e.outcome, e.outcome === "allow" ? "ok" : "bad"), e.reason || "–"]), { caption: t("nav.audit"), empty: t("audit.none") }));
      count.textContent = t("audit.count", { n: entries.length });
      more.hidden = cursor === null;
    }

    async function reload() {
      const res = await get(query(""));
      entries = res.entries || [];
      cursor = res.next_cursor ?? null;
      draw();
    }

    async function loadEarlier() {
      if (cursor === null) return;
      try {
        const res = await get(query(`&cursor=${cursor}`));
        entries = entries.concat(res.entries || []);
        cursor = res.next_cursor ?? null;
        draw();
      } catch (err) { ctx.flash(errorText(err), "error"); }
    }

    async function pollNewest() {
      // newer rows than the newest shown go on top; the older pages already loaded stay
      const res = await get(query(""));
      const newestId = entries.length ? entries[0].id : 0;
      const fresh = (res.entries || []).filter((e) => e.id > newestId);
      if (fresh.length) { entries = fresh.concat(entries); draw(); }
    }

    outcome.addEventListener("change", () => reload().catch((err) => ctx.flash(errorText(err), "error")));
    await reload();
    const timer = setInterval(() => { if (live.checked) pollNewest().catch(() => {}); }, LIVE_SECS * 1000);
    return () => clearInterval(timer);
  },
});
