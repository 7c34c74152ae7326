// The page and slot registry. A feature module (SNI, rate limits, quotas, …) adds its own
// pages with registerPage and its own parts of existing pages with registerSlot; the core
// pages call renderSlots at the named points, so no core file needs editing to slot them in.
export const pages = [];
const slots = new Map();

// registerPage({path: "/rules/:id", title: "nav.rules", nav: true, role: "superadmin"|undefined,
//               public: bool, render(root, params, ctx) -> cleanup function | undefined})
export function registerPage(page) {
  const names = [];
  const source = page.path.replace(/:(\w+)/g, (_, n) => { names.push(n); return "([^/]+)"; });
  pages.push({ ...page, regex: new RegExp(`^${source}/?$`), names });
}

export function matchPage(path) {
  for (const page of pages) {
    const m = page.regex.exec(path);
    if (m) return { page, params: Object.fromEntries(page.names.map((n, i) => [n, decodeURIComponent(m[i + 1])])) };
  }
  return null;
}

// Named slots, e.g. "rule.detail" (container, {rule}), "rule.form" (form, {}), "client.actions" (cell, {client}).
export function registerSlot(name, render) {
  if (!slots.has(name)) slots.set(name, []);
  slots.get(name).push(render);
}

export function renderSlots(name, container, ctx) {
  const cleanups = [];
  for (const render of slots.get(name) || []) {
    const cleanup = render(container, ctx);
    if (typeof cleanup === "function") cleanups.push(cleanup);
  }
  return () => cleanups.forEach((c) => c());
}
