"""Web UI translations: every key in both bundles, every key the code uses exists, same placeholders."""

from __future__ import annotations

import json
import re
from pathlib import Path

WEBUI = Path(__file__).resolve().parents[2] / "portunus" / "http" / "webui"
BUNDLES = ("en", "zh-CN")
# keys built at run time from a value: t(`state.${rule.state}`) and friends, with every value they can take
DYNAMIC = {
    "state": ["active", "pending", "failed", "removing"],
    "role": ["superadmin", "user"],
    "health": ["healthy", "failed"],
    "theme": ["system", "light", "dark"],
    "live": ["connecting", "streaming", "polling", "stopped"],
}


def _bundle(code: str) -> dict:
    return json.loads((WEBUI / "i18n" / f"{code}.json").read_text(encoding="utf-8"))


def _sources() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(WEBUI.rglob("*.js")))


def used_keys() -> set[str]:
    text = _sources()
    keys = set(re.findall(r'\bt\("([a-z0-9_]+\.[a-z0-9_.]+)"', text))
    keys |= set(re.findall(r'title: "([a-z0-9_]+\.[a-z0-9_.]+)"', text))
    for prefix in re.findall(r'\bt\(`([a-z0-9_]+)\.\$\{', text) + re.findall(r'\bt\("([a-z0-9_]+)\." \+', text):
        assert prefix in DYNAMIC, f"dynamic key prefix {prefix!r}: list its values in DYNAMIC"
        keys |= {f"{prefix}.{v}" for v in DYNAMIC[prefix]}
    return keys


def test_both_bundles_have_the_same_keys():
    en, zh = (_bundle(c) for c in BUNDLES)
    assert sorted(set(en) - set(zh)) == [], "keys missing from zh-CN.json"
    assert sorted(set(zh) - set(en)) == [], "keys missing from en.json"


def test_every_key_the_code_uses_is_translated():
    keys = used_keys()
    assert len(keys) > 150  # the scan found the UI's keys, not nothing
    for code in BUNDLES:
        missing = sorted(keys - set(_bundle(code)))
        assert missing == [], f"{code}.json lacks {missing}"


def test_no_empty_text_and_the_same_placeholders():
    en, zh = (_bundle(c) for c in BUNDLES)
    for key, text in en.items():
        assert text.strip() and zh[key].strip(), key
        assert set(re.findall(r"\{(\w+)\}", text)) == set(re.findall(r"\{(\w+)\}", zh[key])), key


def test_chinese_bundle_is_translated_not_copied():
    en, zh = (_bundle(c) for c in BUNDLES)
    same = [k for k in en if en[k] == zh[k] and re.search(r"[a-z]{4}", en[k])]
    assert same == [], f"untranslated: {same}"


def test_the_language_list_names_every_bundle():
    text = (WEBUI / "js" / "i18n.js").read_text(encoding="utf-8")
    for code in BUNDLES:
        assert f'"{code}"' in text
    assert sorted(p.stem for p in (WEBUI / "i18n").glob("*.json")) == sorted(BUNDLES)
