// Onboarding (setup token -> first superadmin), login, change password.
import { post } from "../api.js";
import { add, h, field, input, setFieldError } from "../dom.js";
import { showApiError, byCode, onSubmit } from "../forms.js";
import { t } from "../i18n.js";
import { registerPage } from "../registry.js";

function card(title, ...children) {
  return h("section.auth-card", h("h1", title), ...children);
}

function passwordInput(autocomplete) {
  return input({ type: "password", autocomplete, required: true, minlength: 12 });
}

async function login(ctx, userId, password) {
  const res = await post("auth/login", { user_id: userId, password });
  await ctx.refreshSession();
  if (ctx.session.user && res && res.password_change_required) ctx.session.user.password_change_required = true;
  ctx.navigate(res && res.password_change_required ? "/password" : "/", { replace: true });
}

registerPage({
  path: "/onboarding", title: "auth.onboarding_title", public: true,
  render(root, params, ctx) {
    const token = input({ type: "password", autocomplete: "off", required: true, spellcheck: "false" });
    const userId = input({ autocomplete: "username", required: true, value: "admin", pattern: "[a-z][a-z0-9_-]{0,31}" });
    const name = input({ autocomplete: "name" });
    const pw = passwordInput("new-password");
    const pw2 = passwordInput("new-password");
    const form = h("form.stack", { novalidate: true },
      field(t("auth.setup_token"), token, { name: "setup_token", hint: t("auth.setup_token_hint") }),
      field(t("auth.user_id"), userId, { name: "user_id", hint: t("auth.user_id_hint") }),
      field(t("auth.display_name"), name, { name: "display_name" }),
      field(t("auth.password"), pw, { name: "password", hint: t("auth.password_hint") }),
      field(t("auth.password_repeat"), pw2, { name: "password_repeat" }),
      h("button.primary", { type: "submit" }, t("auth.create_admin")));
    onSubmit(form, async () => {
      if (pw.value !== pw2.value) { setFieldError(pw2, t("auth.passwords_differ")); return; }
      try {
        await post("auth/onboarding", { setup_token: token.value.trim(), user_id: userId.value.trim(),
          display_name: name.value.trim() || userId.value.trim(), password: pw.value });
        ctx.session.bootstrapRequired = false;
        await login(ctx, userId.value.trim(), pw.value);
      } catch (err) {
        if (err.code === "already_bootstrapped") { ctx.session.bootstrapRequired = false; ctx.navigate("/login"); return; }
        showApiError(form, err, byCode({ "setup_token_*": token, "password_*": pw, "validation.*": userId,
          "conflict.user_exists": userId }));
      }
    });
    add(root, card(t("auth.onboarding_title"), h("p", t("auth.onboarding_intro")), form));
  },
});

registerPage({
  path: "/login", title: "auth.login_title", public: true,
  render(root, params, ctx) {
    const userId = input({ autocomplete: "username", required: true });
    const pw = input({ type: "password", autocomplete: "current-password", required: true });
    const notice = ctx.session.notice === "session_expired"
      ? h("p.notice", { role: "status", id: "session-expired" }, t("auth.session_expired")) : null;
    ctx.session.notice = null;
    const form = h("form.stack", { novalidate: true },
      field(t("auth.user_id"), userId, { name: "user_id" }),
      field(t("auth.password"), pw, { name: "password" }),
      h("button.primary", { type: "submit" }, t("auth.login")));
    onSubmit(form, async () => {
      try {
        await login(ctx, userId.value.trim(), pw.value);
      } catch (err) {
        pw.value = "";
        showApiError(form, err);
      }
    });
    add(root, card(t("auth.login_title"), notice, form));
    userId.focus();
  },
});

registerPage({
  path: "/password", title: "auth.password_title",
  render(root, params, ctx) {
    const forced = !!(ctx.session.user && ctx.session.user.password_change_required);
    const current = input({ type: "password", autocomplete: "current-password", required: true });
    const pw = passwordInput("new-password");
    const pw2 = passwordInput("new-password");
    const form = h("form.stack", { novalidate: true },
      field(t("auth.current_password"), current, { name: "current_password" }),
      field(t("auth.new_password"), pw, { name: "new_password", hint: t("auth.password_hint") }),
      field(t("auth.password_repeat"), pw2, { name: "password_repeat" }),
      h("button.primary", { type: "submit" }, t("auth.change_password")));
    onSubmit(form, async () => {
      if (pw.value !== pw2.value) { setFieldError(pw2, t("auth.passwords_differ")); return; }
      try {
        await post("users/me/password", { current_password: current.value, new_password: pw.value });
      } catch (err) {
        showApiError(form, err, byCode({ "password_*": pw, invalid_login: current, unauthenticated: current }));
        return;
      }
      ctx.flash(t("auth.password_changed"));
      try { await ctx.refreshSession(); } catch (_) { /* the next page asks again */ }
      if (ctx.session.user) ctx.session.user.password_change_required = false;
      ctx.navigate(ctx.session.user ? "/" : "/login", { replace: true });
    });
    add(root, card(t("auth.password_title"),
      forced ? h("p.notice", { role: "status", id: "password-forced" }, t("auth.password_forced")) : null, form));
  },
});
