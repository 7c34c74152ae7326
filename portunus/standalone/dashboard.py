"""The live `stats` dashboard, sans-IO (SPEC §7.4).

``Dashboard`` takes stats-socket snapshots with the time they were read and works out live rates;
``press`` applies a key; ``render`` turns the state and a terminal size into styled lines. No
sockets, no curses and no clock in here: ``portunus.standalone.tui`` is the edge that feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Line styles; the curses edge maps them to attributes.
NORMAL, HEADER, SELECTED, DIM, ALERT, TITLE = "normal", "header", "selected", "dim", "alert", "title"

KEY_HELP = "q quit   Enter open/close detail   up/down or j/k select"
NO_RATE = "-"


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_rate(rate: float | None) -> str:
    return NO_RATE if rate is None else human_bytes(rate) + "/s"


def _int(row: dict, key: str) -> int:
    """A counter from a snapshot row; anything that is not a non-negative int reads as 0."""
    v = row.get(key, 0)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def _str(row: dict, key: str, default: str = "") -> str:
    v = row.get(key, default)
    return v if isinstance(v, str) else default


def _rows(value) -> list[dict]:
    return [r for r in value if isinstance(r, dict)] if isinstance(value, list) else []


@dataclass
class Dashboard:
    socket_path: str
    refresh_ms: int
    snapshot: dict | None = None
    connected: bool = False
    error: str | None = None
    lost_at: float | None = None       # when the last good snapshot was read, while disconnected
    now: float = 0.0
    selected: int = 0
    detail: bool = False
    scroll: int = 0
    # (kind, rule_id, sub) -> (bytes_in, bytes_out) of the previous snapshot, and its time
    _prev: dict = field(default_factory=dict)
    _prev_at: float | None = None
    _prev_pid: object = None
    rates: dict = field(default_factory=dict)   # same keys -> (in/s, out/s)

    # ---- input ---------------------------------------------------------------
    def update(self, snapshot: dict, now: float) -> None:
        """A snapshot read at monotonic time ``now``."""
        if snapshot.get("pid") != self._prev_pid:  # a restarted process: old counters mean nothing
            self._prev, self._prev_at = {}, None
        counters = dict(_counter_rows(snapshot))
        dt = None if self._prev_at is None else now - self._prev_at
        self.rates = {}
        for key, (b_in, b_out) in counters.items():
            prev = self._prev.get(key)
            if prev is None or dt is None or dt <= 0 or b_in < prev[0] or b_out < prev[1]:
                continue
            self.rates[key] = ((b_in - prev[0]) / dt, (b_out - prev[1]) / dt)
        self._prev, self._prev_at, self._prev_pid = counters, now, snapshot.get("pid")
        selected_id = _str(self.rules[self.selected], "rule_id") if self.selected < len(self.rules) else None
        self.snapshot, self.connected, self.error, self.lost_at, self.now = snapshot, True, None, None, now
        ids = [_str(r, "rule_id") for r in self.rules]
        # the selection follows its rule when a reload adds or removes rules before it
        self.selected = ids.index(selected_id) if selected_id in ids else min(self.selected, max(len(ids) - 1, 0))

    def lost(self, reason: str, now: float) -> None:
        """The stats socket did not answer; keep the last data on screen, marked stale."""
        if self.connected or self.lost_at is None:
            self.lost_at = self._prev_at if self._prev_at is not None else now
        self.connected, self.error, self.now = False, reason, now
        self._prev, self._prev_at, self.rates = {}, None, {}

    def press(self, key: str) -> bool:
        """Apply a key name (up, down, j, k, home, end, pgup, pgdn, enter, esc, q); False means quit."""
        n = len(self.rules)
        step = {"up": -1, "k": -1, "down": 1, "j": 1, "pgup": -10, "pgdn": 10}.get(key)
        if key in ("q", "Q"):
            return False
        if step is not None and n:
            self.selected = min(max(self.selected + step, 0), n - 1)
        elif key == "home":
            self.selected = 0
        elif key == "end" and n:
            self.selected = n - 1
        elif key == "enter":
            self.detail = not self.detail
        elif key == "esc":
            self.detail = False
        return True

    @property
    def rules(self) -> list[dict]:
        return _rows((self.snapshot or {}).get("rules"))

    def rate(self, *key) -> tuple[float | None, float | None]:
        return self.rates.get(key, (None, None))


def _counter_rows(snapshot: dict):
    """((kind, rule_id, sub), (bytes_in, bytes_out)) for every rule, port and target of a snapshot."""
    for r in _rows(snapshot.get("rules")):
        rid = _str(r, "rule_id")
        yield ("rule", rid, None), (_int(r, "bytes_in"), _int(r, "bytes_out"))
        for p in _rows(r.get("per_port")):
            yield ("port", rid, _int(p, "listen_port")), (_int(p, "bytes_in"), _int(p, "bytes_out"))
        for t in _rows(r.get("per_target")):
            yield ("target", rid, _int(t, "index")), (_int(t, "bytes_in"), _int(t, "bytes_out"))


# ---- rendering -------------------------------------------------------------------

RULE_COLUMNS = (("RULE", 16, "<"), ("PROTO", 5, "<"), ("LISTEN", 20, "<"), ("TARGET(S)", 24, "<"),
                ("STATE", 8, "<"), ("CONN/FLOW", 9, ">"), ("IN", 10, ">"), ("OUT", 10, ">"),
                ("IN/s", 12, ">"), ("OUT/s", 12, ">"))


def _fit(text: str, width: int, align: str = "<") -> str:
    if len(text) > width:
        text = text[:max(width - 1, 0)] + "…" if width > 0 else ""
    return f"{text:{align}{width}}"


def _table_line(cells: list[str], columns) -> str:
    return " ".join(_fit(c, w, a) for c, (_, w, a) in zip(cells, columns))


def _columns(width: int):
    """RULE and TARGET(S) take whatever width the fixed columns leave."""
    fixed = sum(w for t, w, _ in RULE_COLUMNS if t not in ("RULE", "TARGET(S)")) + len(RULE_COLUMNS) - 1
    spare = max(width - fixed, 16 + 24)
    rule_w = max(10, min(32, spare * 2 // 5))
    return tuple((t, rule_w if t == "RULE" else spare - rule_w if t == "TARGET(S)" else w, a)
                 for t, w, a in RULE_COLUMNS)


def listen_text(rule: dict) -> str:
    host = _str(rule, "listen_host", "0.0.0.0")
    ports = _str(rule, "listen", "?")
    if host in ("0.0.0.0", ""):
        return f"*:{ports}"
    return f"[{host}]:{ports}" if ":" in host else f"{host}:{ports}"


def sni_text(rule: dict) -> str:
    """'sni <pattern> ' for an SNI rule, 'sni fallback ' for the plain rule of an SNI port, else ''."""
    pattern = _str(rule, "sni_pattern")
    if pattern:
        return f"sni {pattern} -> "
    listener = rule.get("sni_listener")
    return "sni fallback -> " if isinstance(listener, dict) and listener.get("mode") == "sni" else ""


def _sni_facts(rule: dict) -> str:
    routes = rule.get("sni_routes") if isinstance(rule.get("sni_routes"), dict) else {}
    listener = rule.get("sni_listener") if isinstance(rule.get("sni_listener"), dict) else {}
    if not routes and not listener:
        return ""
    return (f"sni routed exact {_int(routes, 'exact')} wildcard {_int(routes, 'wildcard')} fallback "
            f"{_int(routes, 'fallback')}  port: routes {_int(listener, 'routes_active')} misses "
            f"{_int(listener, 'misses')} parse failures {_int(listener, 'parse_failures')} hello timeouts "
            f"{_int(listener, 'hello_timeouts')} reset {_int(listener, 'reads_reset')}")


def targets_text(rule: dict) -> str:
    labels = _labels(rule)
    if not labels:
        return sni_text(rule) + "?"
    return sni_text(rule) + (labels[0] if len(labels) == 1 else f"{labels[0]} +{len(labels) - 1}")


def _live(rule: dict) -> int:
    return _int(rule, "active_flows") if _str(rule, "protocol") == "udp" else _int(rule, "active_connections")


def _limit_stats(rule: dict) -> dict:
    stats = rule.get("rate_limit")
    return stats if isinstance(stats, dict) else {}


def throttling(rule: dict) -> list[str]:
    """The directions a bandwidth cap is holding back right now (readers parked on a bucket)."""
    now = _limit_stats(rule).get("throttling")
    return [d for d in now if d in ("in", "out")] if isinstance(now, list) else []


def state_text(rule: dict) -> str:
    """'throttle' while an active rule's bandwidth cap holds traffic back, else its state."""
    state = _str(rule, "state", "?")
    return "throttle" if state == "active" and throttling(rule) else state


def caps_text(caps) -> str:
    """``↓1.0 MiB/s ↑- 100/s ≤1000`` (in, out, new connections, concurrency); '-' when uncapped."""
    if not isinstance(caps, dict) or not caps:
        return "-"
    def num(key):
        v = caps.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
    parts = [f"↓{human_rate(num('bandwidth_in_bps'))}", f"↑{human_rate(num('bandwidth_out_bps'))}"]
    parts += [f"{num('new_connections_per_sec')}/s"] if num("new_connections_per_sec") else []
    parts += [f"≤{num('concurrent_connections')}"] if num("concurrent_connections") else []
    return " ".join(parts)


def _limit_facts(rule: dict) -> str:
    stats = _limit_stats(rule)
    if not stats and not rule.get("caps"):
        return ""
    secs = stats.get("throttle_seconds") if isinstance(stats.get("throttle_seconds"), dict) else {}

    def sec(d):
        v = secs.get(d)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else 0.0
    rejects = stats.get("rejects") if isinstance(stats.get("rejects"), dict) else {}
    rejected = " ".join(f"{k} {_int(rejects, k)}" for k in sorted(rejects) if _int(rejects, k)) or "none"
    now = throttling(rule)
    return (f"caps {caps_text(rule.get('caps'))}  throttled in {sec('in'):.1f} s out {sec('out'):.1f} s"
            f"{'  (throttling ' + ', '.join(now) + ' now)' if now else ''}  rejected {rejected}  "
            f"bandwidth dropped in {_int(stats, 'bandwidth_dropped_in')} out {_int(stats, 'bandwidth_dropped_out')}")


def _rule_cells(dash: Dashboard, rule: dict) -> list[str]:
    r_in, r_out = dash.rate("rule", _str(rule, "rule_id"), None)
    return [_str(rule, "rule_id"), _str(rule, "protocol"), listen_text(rule), targets_text(rule),
            state_text(rule), str(_live(rule)), human_bytes(_int(rule, "bytes_in")),
            human_bytes(_int(rule, "bytes_out")), human_rate(r_in), human_rate(r_out)]


def _total_cells(dash: Dashboard, rules: list[dict]) -> list[str]:
    rates = [dash.rate("rule", _str(r, "rule_id"), None) for r in rules]
    known = [r for r in rates if r[0] is not None]
    return ["TOTAL", "", f"{len(rules)} rule{'s' if len(rules) != 1 else ''}", "", "",
            str(sum(_live(r) for r in rules)), human_bytes(sum(_int(r, "bytes_in") for r in rules)),
            human_bytes(sum(_int(r, "bytes_out") for r in rules)),
            human_rate(sum(r[0] for r in known) if known else None),
            human_rate(sum(r[1] for r in known) if known else None)]


def _status_lines(dash: Dashboard, width: int) -> list[tuple[str, str]]:
    snap = dash.snapshot or {}
    title = f"portunus-standalone stats  {_str(snap, 'label')}  socket {dash.socket_path}  every {dash.refresh_ms} ms"
    if dash.connected:
        return [(_fit(title + "   connected", width), TITLE)]
    age = "" if dash.snapshot is None or dash.lost_at is None else \
        f" (showing data from {max(dash.now - dash.lost_at, 0):.0f} s ago)"
    return [(_fit(title, width), TITLE),
            (_fit(f"reconnecting…{age}: {dash.error or 'no answer'}", width), ALERT)]


def render(dash: Dashboard, width: int, height: int) -> list[tuple[str, str]]:
    """The whole screen as (text, style) lines, each at most ``width`` wide, at most ``height`` of them."""
    width, height = max(width, 1), max(height, 1)
    lines = _status_lines(dash, width)
    columns = _columns(width - 1)  # the first column marks the selected row
    rules = dash.rules
    if dash.snapshot is None:
        lines.append(("waiting for the first snapshot…", DIM))
        return _finish(lines, width, height)
    lines.append((_fit(" " + _table_line([t for t, _, _ in columns], columns), width), HEADER))
    detail = _detail_lines(dash, rules[dash.selected], width) if dash.detail and rules else []
    available = max(height - len(lines) - 2, 1)  # below: the totals line and the key help
    room = max(min(len(rules), available - (len(detail) + 1 if detail else 0)), min(len(rules), 3, available), 1)
    # scroll (view state kept on the dashboard) so the selected row stays visible
    scroll = min(max(dash.scroll, dash.selected - room + 1), dash.selected)
    dash.scroll = scroll = max(min(scroll, len(rules) - room), 0)
    style = NORMAL if dash.connected else DIM
    for i in range(scroll, min(scroll + room, len(rules))):
        marker = ">" if i == dash.selected else " "
        text = _fit(marker + _table_line(_rule_cells(dash, rules[i]), columns), width)
        lines.append((text, SELECTED if i == dash.selected else style))
    if not rules:
        lines.append(("(no rules)", DIM))
    lines.append((_fit(" " + _table_line(_total_cells(dash, rules), columns), width), HEADER))
    if detail:
        lines.append(("", NORMAL))
        lines.extend(detail[:max(height - len(lines) - 1, 0)])
    return _finish(lines, width, height)


def _finish(lines: list[tuple[str, str]], width: int, height: int) -> list[tuple[str, str]]:
    """Cut to the screen and put the key help on its last line."""
    body = [(text[:width], style) for text, style in lines[:max(height - 1, 0)]]
    body += [("", NORMAL)] * (height - 1 - len(body))
    return body + [(_fit(KEY_HELP, width), DIM)]


PORT_COLUMNS = (("PORT", 7, ">"), ("CONNS", 6, ">"), ("DGRAMS IN", 10, ">"), ("DGRAMS OUT", 10, ">"),
                ("IN", 10, ">"), ("OUT", 10, ">"), ("IN/s", 12, ">"), ("OUT/s", 12, ">"))
TARGET_COLUMNS = (("TARGET", 28, "<"), ("PRIO", 4, ">"), ("HEALTH", 7, "<"), ("FAILS", 5, ">"),
                  ("CONNS", 6, ">"), ("IN", 10, ">"), ("OUT", 10, ">"), ("IN/s", 12, ">"), ("OUT/s", 12, ">"))
MAX_DETAIL_PORTS = 16


def _detail_lines(dash: Dashboard, rule: dict, width: int) -> list[tuple[str, str]]:
    rid = _str(rule, "rule_id")
    head = (f"rule {rid!r}: {_str(rule, 'protocol')} {listen_text(rule)} {sni_text(rule) or '-> '}"
            f"{', '.join(_labels(rule)) or '?'}"
            f"  state {_str(rule, 'state', '?')}")
    if _str(rule, "reason"):
        head += f" ({_str(rule, 'reason')})"
    facts = (f"connections total {_int(rule, 'connections_total')}  connect failures "
             f"{_int(rule, 'connect_failures')}  dns failures {_int(rule, 'dns_failures')}  flows dropped "
             f"{_int(rule, 'flows_dropped_overflow')}  send dropped {_int(rule, 'send_dropped')}  failovers "
             f"{_int(rule, 'target_failovers_total')}")
    out = [(_fit(head, width), TITLE), (_fit(facts, width), NORMAL)]
    for extra in (_sni_facts(rule), _limit_facts(rule)):
        if extra:
            out.append((_fit(extra, width), NORMAL))
    out.append((_fit(_table_line([t for t, _, _ in PORT_COLUMNS], PORT_COLUMNS), width), HEADER))
    ports = _rows(rule.get("per_port"))
    shown = _busiest_ports(dash, rid, ports)
    for p in shown:
        port = _int(p, "listen_port")
        p_in, p_out = dash.rate("port", rid, port)
        cells = [str(port), str(_int(p, "active_connections")), str(_int(p, "datagrams_in")),
                 str(_int(p, "datagrams_out")), human_bytes(_int(p, "bytes_in")), human_bytes(_int(p, "bytes_out")),
                 human_rate(p_in), human_rate(p_out)]
        out.append((_fit(_table_line(cells, PORT_COLUMNS), width), NORMAL))
    if len(shown) < len(ports):
        out.append((f"… {len(ports) - len(shown)} more ports (the busiest are shown)", DIM))
    out.append((_fit(_table_line([t for t, _, _ in TARGET_COLUMNS], TARGET_COLUMNS), width), HEADER))
    labels = _labels(rule)
    for t in _rows(rule.get("per_target")):
        index = _int(t, "index")
        t_in, t_out = dash.rate("target", rid, index)
        label = labels[index] if index < len(labels) else f"{_str(t, 'host')}:{_int(t, 'port')}"
        cells = [label, str(_int(t, "priority")), _str(t, "health", "?"), str(_int(t, "consecutive_failures")),
                 str(_int(t, "connections")), human_bytes(_int(t, "bytes_in")), human_bytes(_int(t, "bytes_out")),
                 human_rate(t_in), human_rate(t_out)]
        out.append((_fit(_table_line(cells, TARGET_COLUMNS), width), NORMAL))
    return out


def _labels(rule: dict) -> list[str]:
    targets = rule.get("targets")
    return [t for t in targets if isinstance(t, str)] if isinstance(targets, list) else []


def _busiest_ports(dash: Dashboard, rid: str, ports: list[dict]) -> list[dict]:
    """Every port of a small rule; for a wide range the busiest few (by live rate, then bytes), in port order."""
    if len(ports) <= MAX_DETAIL_PORTS:
        return ports

    def activity(p: dict) -> tuple:
        r_in, r_out = dash.rate("port", rid, _int(p, "listen_port"))
        return ((r_in or 0) + (r_out or 0), _int(p, "bytes_in") + _int(p, "bytes_out"), -_int(p, "listen_port"))
    busiest = sorted(ports, key=activity, reverse=True)[:MAX_DETAIL_PORTS]
    return sorted(busiest, key=lambda p: _int(p, "listen_port"))


ASCII = str.maketrans({"…": "...", "→": "->", "↓": "v", "↑": "^", "≤": "<="})


def to_ascii(text: str) -> str:
    """For terminals whose encoding is not UTF-8."""
    return text.translate(ASCII).encode("ascii", "replace").decode("ascii")
