"""Both Web UI themes meet WCAG AA: every text colour pair the stylesheet uses is >= 4.5:1."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CSS = (Path(__file__).resolve().parents[2] / "portunus" / "http" / "webui" / "style.css").read_text(encoding="utf-8")
AA_TEXT = 4.5
# (foreground, background): text colours on the backgrounds they are drawn on in style.css
PAIRS = [
    ("text", "bg"), ("text", "surface"), ("text", "code-bg"), ("muted", "bg"), ("muted", "surface"),
    ("link", "bg"), ("link", "surface"), ("on-primary", "primary"), ("on-danger", "danger"),
    ("ok-fg", "ok-bg"), ("warn-fg", "warn-bg"), ("bad-fg", "bad-bg"), ("info-fg", "info-bg"),
    ("bad-fg", "bg"), ("bad-fg", "surface"), ("primary", "bg"),
]


def _palette(block: str) -> dict:
    return dict(re.findall(r"--([\w-]+):\s*(#[0-9a-fA-F]{6})", block))


def _themes() -> dict:
    light = _palette(CSS[CSS.index(":root {"):CSS.index("}", CSS.index(":root {"))])
    start = CSS.index(':root[data-theme="dark"] {')
    dark = _palette(CSS[start:CSS.index("}", start)])
    system_start = CSS.index(':root[data-theme="system"] {')
    system_dark = _palette(CSS[system_start:CSS.index("}", system_start)])
    return {"light": light, "dark": dark, "system-dark": system_dark}


def _luminance(hex_colour: str) -> float:
    def channel(c: int) -> float:
        s = c / 255
        return s / 12.92 if s <= 0.03928 else ((s + 0.055) / 1.055) ** 2.4
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_contrast_formula_matches_known_values():
    assert contrast("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)


def test_the_system_theme_uses_the_dark_palette_when_the_os_is_dark():
    themes = _themes()
    assert themes["dark"] == themes["system-dark"]


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_every_text_pair_meets_aa(theme):
    palette = _themes()[theme]
    low = {f"{fg} on {bg}": round(contrast(palette[fg], palette[bg]), 2) for fg, bg in PAIRS
           if contrast(palette[fg], palette[bg]) < AA_TEXT}
    assert low == {}, f"{theme} theme below {AA_TEXT}:1"
