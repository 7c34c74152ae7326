"""Web UI files: the size budget, what the files may not do, and how static.resolve maps paths."""

from __future__ import annotations

import re
from pathlib import Path

from portunus.http import static

WEBUI = Path(__file__).resolve().parents[2] / "portunus" / "http" / "webui"
BUDGET_BYTES = 250 * 1024


def _files():
    return [p for p in WEBUI.rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def test_the_whole_ui_fits_the_budget():
    total = sum(p.stat().st_size for p in _files())
    assert 20_000 < total <= BUDGET_BYTES, f"Web UI is {total} bytes (budget {BUDGET_BYTES})"


def test_index_has_no_inline_script_or_style_and_loads_modules():
    html = (WEBUI / "index.html").read_text(encoding="utf-8")
    assert re.search(r"<script[^>]*>\s*[^<\s]", html) is None, "inline script (CSP forbids it)"
    assert "<style" not in html and " style=" not in html and " on" not in re.sub(r"<noscript>.*?</noscript>", "", html)
    assert '<script type="module" src="__ASSETS__/js/app.js"></script>' in html


def test_scripts_never_build_markup_from_strings_or_reach_other_origins():
    for p in WEBUI.rglob("*.js"):
        text = p.read_text(encoding="utf-8")
        for bad in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert bad not in text, f"{p.name} uses {bad}"
        urls = [u for u in re.findall(r"https?://[^\s\"'`)]+", text) if u != "http://www.w3.org/2000/svg"]
        assert urls == [], f"{p.name} names another origin: {urls}"


def test_browser_storage_holds_only_theme_and_language():
    keys = set()
    for p in WEBUI.rglob("*.js"):
        text = p.read_text(encoding="utf-8")
        assert "sessionStorage" not in text and "document.cookie" not in text, p.name
        keys |= set(re.findall(r'STORAGE_KEY = "([^"]+)"', text))
        for call in re.findall(r"localStorage\.(\w+)\(([^,)]*)", text):
            assert call[1].strip() == "STORAGE_KEY", f"{p.name}: localStorage.{call[0]}({call[1]})"
    assert keys == {"portunus.theme", "portunus.lang"}


def test_every_write_carries_the_csrf_header():
    text = (WEBUI / "js" / "api.js").read_text(encoding="utf-8")
    assert 'headers["X-Portunus-CSRF"] = "1"' in text and '"Content-Type"] = "application/json"' in text
    for p in (WEBUI / "js").rglob("*.js"):
        if p.name != "api.js":
            assert "fetch(" not in p.read_text(encoding="utf-8") or p.name == "i18n.js", f"{p.name} bypasses api.js"


def test_resolve_serves_files_and_falls_back_to_index_for_routes():
    ctype, body, cache = static.resolve("/")
    version = static.asset_version()
    assert ctype.startswith("text/html") and cache == "no-cache"
    assert f'src="/assets/{version}/js/app.js"'.encode() in body and b"__ASSETS__" not in body
    assert static.resolve("/rules/01ABC")[1] == body
    assert static.resolve("/users?x=1")[1] == body
    ctype, js, cache = static.resolve(f"/assets/{version}/js/app.js")
    assert ctype.startswith("text/javascript") and b"import" in js and cache == static.IMMUTABLE
    assert static.resolve("/js/app.js")[1:] == (js, "no-cache")
    assert static.resolve(f"/assets/{version}/style.css")[0].startswith("text/css")
    assert static.resolve(f"/assets/{version}/i18n/zh-CN.json")[0] == "application/json"
    assert static.resolve(f"/assets/{version}/favicon.svg")[0] == "image/svg+xml"
    # a page from an older build asks for its version: today's file, not cached for good
    assert static.resolve("/assets/0123456789abcdef/js/app.js")[1:] == (js, "no-cache")


def test_the_asset_version_follows_the_files():
    version = static.asset_version()
    assert len(version) == 16 and int(version, 16) >= 0
    static.asset_version.cache_clear()
    assert static.asset_version() == version  # the same files, the same version


def test_resolve_refuses_what_is_not_a_ui_file():
    for target in ("/nope.js", "/../static.py", "/%2e%2e/static.py", "/js/../../routes.py", "/.hidden.js",
                   "/js/pages/../../../app.py", "/assets/x/../../static.py", "/assets/v/.hidden.js", "/assets/v/nope.js"):
        assert static.resolve(target) is None, target


def test_every_module_imported_exists():
    for p in WEBUI.rglob("*.js"):
        for spec in re.findall(r'^import [^;]*?from "([^"]+)"', p.read_text(encoding="utf-8"), re.M):
            assert (p.parent / spec).resolve().is_file(), f"{p.name} imports missing {spec}"
        for spec in re.findall(r'^import "([^"]+)";', p.read_text(encoding="utf-8"), re.M):
            assert (p.parent / spec).resolve().is_file(), f"{p.name} imports missing {spec}"


def test_index_preloads_every_module_so_the_first_page_loads_in_one_wave():
    html = (WEBUI / "index.html").read_text(encoding="utf-8")
    preloaded = set(re.findall(r'<link rel="modulepreload" href="__ASSETS__/([^"]+)">', html))
    modules = {p.relative_to(WEBUI).as_posix() for p in WEBUI.rglob("*.js")} - {"js/app.js"}
    assert preloaded == modules
