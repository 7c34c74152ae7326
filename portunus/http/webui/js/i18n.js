// Translations: one JSON bundle per language under /i18n/, every key in every bundle
// (tests/unit/test_webui_i18n.py fails on a missing key). The choice lives in localStorage.
export const LANGUAGES = [["en", "English"], ["zh-CN", "简体中文"]];
const STORAGE_KEY = "portunus.lang";
let bundle = {};
let fallback = {};
let current = "en";

export function currentLanguage() { return current; }

export function storedLanguage() {
  const saved = localStorage.getItem(STORAGE_KEY);
  if (LANGUAGES.some(([code]) => code === saved)) return saved;
  return (navigator.language || "").toLowerCase().startsWith("zh") ? "zh-CN" : "en";
}

async function load(code) {
  // relative to this module, so under the same versioned /assets/<version>/ prefix (and the preload)
  const res = await fetch(new URL(`../i18n/${code}.json`, import.meta.url));
  if (!res.ok) throw new Error(`language bundle ${code}: HTTP ${res.status}`);
  return res.json();
}

export async function setLanguage(code, { remember = true } = {}) {
  if (!LANGUAGES.some(([c]) => c === code)) code = "en";
  if (!Object.keys(fallback).length) fallback = await load("en");
  bundle = code === "en" ? fallback : await load(code);
  current = code;
  document.documentElement.lang = code;
  if (remember) localStorage.setItem(STORAGE_KEY, code);
}

// t("rule.count", {shown: 3, total: 9}) -> the bundle's text with {n} filled in
export function t(key, vars) {
  let text = bundle[key] ?? fallback[key] ?? key;
  if (vars) text = text.replace(/\{(\w+)\}/g, (m, name) => (name in vars ? String(vars[name]) : m));
  return text;
}
