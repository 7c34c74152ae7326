// Boot, session, client-side routing and the page frame. Pages live in pages/*.js and
// register themselves; this file only decides which one shows and who may see it.
import { get, post, setAuthProblemHandler } from "./api.js";
import { add, h, clear } from "./dom.js";
import { setLanguage, storedLanguage, t } from "./i18n.js";
import { matchPage, pages } from "./registry.js";
import { applyTheme, storedTheme } from "./theme.js";
import "./pages/auth.js";
import "./pages/dashboard.js";
import "./pages/clients.js";
import "./pages/rules.js";
import "./pages/rule_detail.js";
import "./pages/users.js";
import "./pages/quotas.js";
import "./pages/client_detail.js";
import "./pages/sni.js";
import "./pages/qos.js";
import "./pages/audit.js";
import "./pages/metrics.js";
import "./pages/settings.js";

// what the server told us about who is logged in; never a token (the cookie is HttpOnly)
export const session = { known: false, bootstrapRequired: false, user: null, notice: null };
let cleanup = null;
let renderSeq = 0;

export async function refreshSession() {
  const status = await get("auth/status", { quiet: true });
  session.known = true;
  session.bootstrapRequired = !!status.bootstrap_required;
  session.user = status.authenticated ? status.user || null : null;
  if (session.user && status.password_change_required) session.user.password_change_required = true;
  return session;
}

export function isSuperadmin() { return !!session.user && session.user.role === "superadmin"; }

export function navigate(path, { replace = false } = {}) {
  if (path !== location.pathname + location.search) {
    if (replace) history.replaceState(null, "", path); else history.pushState(null, "", path);
  }
  render();
}

export function flash(message, kind = "info") {
  const box = document.getElementById("flash");
  const note = h(`p.flash.${kind}`, message, h("button.link", { type: "button", "aria-label": t("common.dismiss"),
    onclick: () => note.remove() }, "×"));
  add(box, note);
  setTimeout(() => note.remove(), kind === "error" ? 10000 : 5000);
}

function onAuthProblem(err) {
  if (err.code === "unauthenticated" && session.user) {
    session.user = null;
    session.notice = "session_expired";
    navigate("/login", { replace: true });
  } else if (err.code === "password_change_required" && session.user) {
    session.user.password_change_required = true;
    navigate("/password", { replace: true });
  } else if (err.code === "bootstrap_required") {
    session.bootstrapRequired = true;
    navigate("/onboarding", { replace: true });
  }
}

export async function logout() {
  try { await post("auth/logout", undefined, { quiet: true }); } catch (_) { /* the session is gone either way */ }
  session.user = null;
  navigate("/login", { replace: true });
}

function renderNav(current) {
  const nav = document.getElementById("nav");
  const topbar = document.getElementById("topbar");
  clear(nav);
  topbar.hidden = !session.user;
  if (!session.user) return;
  const list = h("ul");
  for (const page of pages) {
    if (!page.nav || (page.role === "superadmin" && !isSuperadmin())) continue;
    const active = current && (current.page === page || current.page.navParent === page.path);
    add(list, h("li", h("a", { href: page.path, "aria-current": active ? "page" : null }, t(page.title))));
  }
  add(nav, list);
  const who = clear(document.getElementById("who"));
  add(who, h("span.user", session.user.display_name || session.user.user_id),
    h("span.role", t(`role.${session.user.role}`)),
    h("button.link", { type: "button", onclick: logout, id: "logout" }, t("nav.logout")));
}

function guard(match) {
  const path = match ? match.page.path : null;
  if (session.bootstrapRequired) return path === "/onboarding" ? null : "/onboarding";
  if (!match) return null;
  if (path === "/onboarding") return session.user ? "/" : "/login";
  if (match.page.public) return session.user ? "/" : null;
  if (!session.user) return "/login";
  if (session.user.password_change_required && path !== "/password") return "/password";
  return null;
}

export async function render() {
  const seq = ++renderSeq;
  if (cleanup) { try { cleanup(); } catch (_) { /* a page's cleanup must not block the next page */ } cleanup = null; }
  const main = document.getElementById("main");
  if (!session.known) {
    try { await refreshSession(); } catch (e) {
      add(clear(main), h("p.form-error", t("error.server_unreachable"), " ", e.message));
      return;
    }
  }
  if (seq !== renderSeq) return;
  const match = matchPage(location.pathname);
  const redirect = guard(match);
  if (redirect && redirect !== location.pathname) { navigate(redirect, { replace: true }); return; }
  renderNav(match);
  closeMenu();
  clear(main);
  if (!match) {
    add(main, h("h1", t("error.not_found_title")), h("p", t("error.not_found_page")), h("a", { href: "/" }, t("nav.dashboard")));
    document.title = "Portunus";
    return;
  }
  if (match.page.role === "superadmin" && !isSuperadmin()) {
    add(main, h("h1", t("error.forbidden_title")), h("p", t("error.role_required")));
    return;
  }
  document.title = `${t(match.page.title)} · Portunus`;
  const ctx = { session, navigate, flash, refreshSession, isSuperadmin, rerender: render };
  try {
    const result = await match.page.render(main, match.params, ctx);
    // bench/webui.py and the browser tests read this mark: the page is drawn with its data
    performance.mark("portunus:rendered", { detail: location.pathname });
    if (seq === renderSeq) cleanup = typeof result === "function" ? result : null;
    else if (typeof result === "function") result();
  } catch (e) {
    performance.mark("portunus:render-failed", { detail: location.pathname });
    if (seq === renderSeq && !["unauthenticated", "password_change_required", "bootstrap_required"].includes(e.code)) {
      add(main, h("p.form-error#render-error", { role: "alert" }, e.message || String(e)));
    }
  }
}

function closeMenu() {
  document.getElementById("nav").classList.remove("open");
  document.getElementById("menu-toggle").setAttribute("aria-expanded", "false");
}

function wireFrame() {
  // same-origin links route on the client side; modified clicks and downloads keep browser behaviour
  document.addEventListener("click", (e) => {
    const a = e.target.closest && e.target.closest("a[href]");
    if (!a || a.target || a.hasAttribute("download") || e.defaultPrevented || e.button !== 0 ||
        e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
    const url = new URL(a.href, location.href);
    if (url.origin !== location.origin || url.pathname.startsWith("/v1/") || url.pathname === location.pathname && url.hash) return;
    e.preventDefault();
    navigate(url.pathname + url.search);
  });
  window.addEventListener("popstate", render);
  const toggle = document.getElementById("menu-toggle");
  toggle.setAttribute("aria-label", t("nav.menu"));
  toggle.addEventListener("click", () => {
    const nav = document.getElementById("nav");
    const open = nav.classList.toggle("open");
    toggle.setAttribute("aria-expanded", String(open));
  });
  setAuthProblemHandler(onAuthProblem);
}

async function boot() {
  applyTheme(storedTheme());
  // who is logged in and the language bundle load in parallel: the first page needs both
  const status = refreshSession().catch(() => { session.known = false; });
  try { await setLanguage(storedLanguage(), { remember: false }); } catch (_) { /* keys show as-is */ }
  await status;
  document.querySelector(".skip").textContent = t("nav.skip");
  wireFrame();
  await render();
}

boot();
