// Light / dark / system theme: a data-theme attribute on <html>; the CSS does the rest.
export const THEMES = ["system", "light", "dark"];
const STORAGE_KEY = "portunus.theme";

export function storedTheme() {
  const saved = localStorage.getItem(STORAGE_KEY);
  return THEMES.includes(saved) ? saved : "system";
}

export function applyTheme(theme, { remember = false } = {}) {
  if (!THEMES.includes(theme)) theme = "system";
  document.documentElement.dataset.theme = theme;
  if (remember) localStorage.setItem(STORAGE_KEY, theme);
}
