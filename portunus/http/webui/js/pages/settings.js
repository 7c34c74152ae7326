// Settings: advertised endpoint (superadmin; effective value, source, diagnostic, save/clear with
// the 422 messages inline), theme, language, and a link to change one's own password.
import { get, put } from "../api.js";
import { add, h, clear, field, input, select, button } from "../dom.js";
import { showApiError, byCode, onSubmit } from "../forms.js";
import { t, LANGUAGES, currentLanguage, setLanguage } from "../i18n.js";
import { registerPage, renderSlots } from "../registry.js";
import { THEMES, storedTheme, applyTheme } from "../theme.js";

function endpointPanel(ctx) {
  const box = h("section.panel#endpoint-panel", h("h2", t("settings.endpoint_title")));
  const value = input({ autocomplete: "off", placeholder: "portunus.example.com:7443", spellcheck: "false" });
  const facts = h("dl.facts#endpoint-facts");
  const form = h("form.stack", { novalidate: true },
    field(t("settings.endpoint_override"), value, { name: "override", hint: t("settings.endpoint_hint") }),
    h("div.row-actions", h("button.primary", { type: "submit" }, t("common.save")),
      button(t("settings.endpoint_clear"), () => save(null), { class: "secondary", id: "endpoint-clear" })));
  async function load() {
    const info = await get("settings/advertised-endpoint");
    value.value = info.override || "";
    add(clear(facts), h("dt", t("settings.effective")), h("dd.mono#endpoint-effective", info.effective || "–"),
      h("dt", t("settings.source")), h("dd#endpoint-source", info.source || "–"),
      h("dt", t("settings.diagnostic")), h("dd", info.diagnostic || "–"));
  }
  async function save(override) {
    try {
      await put("settings/advertised-endpoint", { override });
      ctx.flash(override === null ? t("settings.endpoint_cleared") : t("settings.endpoint_saved"));
      await load();
    } catch (err) {
      showApiError(form, err, byCode({ "endpoint_*": value, "validation.*": value }));
    }
  }
  onSubmit(form, () => save(value.value.trim() || null));
  add(box, facts, form);
  return { box, load };
}

registerPage({
  path: "/settings", title: "nav.settings", nav: true,
  async render(root, params, ctx) {
    const theme = select(THEMES.map((th) => [th, t(`theme.${th}`)]), { id: "theme-select" });
    theme.value = storedTheme();
    theme.addEventListener("change", () => applyTheme(theme.value, { remember: true }));
    const lang = select(LANGUAGES, { id: "language-select" });
    lang.value = currentLanguage();
    lang.addEventListener("change", async () => { await setLanguage(lang.value); ctx.rerender(); });
    add(root, h("h1", t("nav.settings")),
      h("section.panel", h("h2", t("settings.appearance")),
        h("div.grid2", field(t("settings.theme"), theme), field(t("settings.language"), lang))),
      h("section.panel", h("h2", t("settings.account")),
        h("p", t("settings.signed_in_as", { user: ctx.session.user.user_id, role: t(`role.${ctx.session.user.role}`) })),
        h("a.button", { href: "/password" }, t("auth.change_password"))));
    if (ctx.isSuperadmin()) {
      const ep = endpointPanel(ctx);
      add(root, ep.box);
      await ep.load();
    }
    return renderSlots("settings", root, {});
  },
});
