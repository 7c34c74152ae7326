"""Prometheus text exposition (format 0.0.4), sans-IO: families in, text out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Family:
    name: str
    type: str  # counter | gauge | histogram
    help: str
    samples: list = field(default_factory=list)  # (suffix, labels: dict, value)

    def add(self, labels: dict, value: float, suffix: str = "") -> None:
        self.samples.append((suffix, labels, value))


def _escape_label(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _fmt(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def render(families: list[Family]) -> str:
    lines = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.type}")
        for suffix, labels, value in fam.samples:
            if labels:
                body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
                lines.append(f"{fam.name}{suffix}{{{body}}} {_fmt(value)}")
            else:
                lines.append(f"{fam.name}{suffix} {_fmt(value)}")
    return "\n".join(lines) + "\n"
