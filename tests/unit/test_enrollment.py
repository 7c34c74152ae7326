"""Enrollment URI, enroll command, client bundle file and its lookup (SPEC §3.2, §3.3)."""

from __future__ import annotations

import io
import json
import os
import shlex
import stat
import subprocess

import pytest

from portunus.control.enrollment import (EnrollmentURI, bundle_search_paths, default_bundle_path, enroll_command,
                                         find_bundle, make_uri, parse_uri, read_bundle, write_bundle)
from portunus.errors import PortunusError
from portunus.log import log

FP = "ab" * 32
CODE = "Zq7_k-3xYVn1"
GOOD = f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP}&code={CODE}"
TOKEN = "tok_5b2a9c0e4f1d8e7a6b3c2d1e0f9a8b7c"


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------ URI

def test_make_uri_has_the_spec_shape():
    assert make_uri("edge.example.com", 7443, FP, CODE) == GOOD


@pytest.mark.parametrize("host,port,code", [
    ("edge.example.com", 7443, CODE),
    ("127.0.0.1", 7443, "abc"),
    ("localhost", 1, "x"),
    ("a-b.c_d.example", 65535, "A.b~c-d_e"),
    ("portunus", 443, "needs/escaping?&=+%#"),
])
def test_uri_round_trip(host, port, code):
    uri = make_uri(host, port, FP.upper(), code)
    parsed = parse_uri(uri)
    assert parsed == EnrollmentURI(host=host, port=port, fingerprint=FP, code=code)
    assert parsed.endpoint == f"{host}:{port}"
    assert parsed.to_uri() == uri
    assert make_uri(parsed.host, parsed.port, parsed.fingerprint, parsed.code) == uri


def test_parse_accepts_uppercase_scheme_and_hex_and_normalizes_the_pin():
    parsed = parse_uri(f"PORTUNUS://edge.example.com:7443/enroll?code={CODE}&pin=sha256:{FP.upper()}")
    assert parsed.fingerprint == FP and parsed.code == CODE and parsed.port == 7443


def test_repr_of_a_parsed_uri_does_not_show_the_code():
    parsed = parse_uri(GOOD)
    assert CODE not in repr(parsed)
    assert FP in repr(parsed)


MALFORMED = [
    # (uri, words the message must contain)
    ("", "empty"),
    (f"https://edge.example.com:7443/enroll?pin=sha256:{FP}&code={CODE}", "scheme must be portunus://, got https://"),
    (f"portunus:/edge.example.com:7443/enroll?pin=sha256:{FP}&code={CODE}", "missing scheme"),
    (f"edge.example.com:7443/enroll?pin=sha256:{FP}&code={CODE}", "missing scheme"),
    (f"portunus://edge.example.com/enroll?pin=sha256:{FP}&code={CODE}", "missing port"),
    (f"portunus://edge.example.com:/enroll?pin=sha256:{FP}&code={CODE}", "missing port"),
    (f"portunus://edge.example.com:abc/enroll?pin=sha256:{FP}&code={CODE}", "port 'abc' is not a number 1-65535"),
    (f"portunus://edge.example.com:0/enroll?pin=sha256:{FP}&code={CODE}", "port '0'"),
    (f"portunus://edge.example.com:65536/enroll?pin=sha256:{FP}&code={CODE}", "port '65536'"),
    (f"portunus://edge.example.com:07443/enroll?pin=sha256:{FP}&code={CODE}", "port '07443'"),
    (f"portunus://edge.example.com:-1/enroll?pin=sha256:{FP}&code={CODE}", "port '-1'"),
    (f"portunus://edge.example.com:7443x/enroll?pin=sha256:{FP}&code={CODE}", "port '7443x'"),
    (f"portunus://:7443/enroll?pin=sha256:{FP}&code={CODE}", "missing host"),
    (f"portunus://[::1]:7443/enroll?pin=sha256:{FP}&code={CODE}", "IPv6 literal"),
    (f"portunus://[2001:db8::1]:7443/enroll?pin=sha256:{FP}&code={CODE}", "IPv6 literal"),
    (f"portunus://2001:db8::1:7443/enroll?pin=sha256:{FP}&code={CODE}", "IPv6 literal"),
    (f"portunus://user@edge.example.com:7443/enroll?pin=sha256:{FP}&code={CODE}", "user info"),
    (f"portunus://edge..example.com:7443/enroll?pin=sha256:{FP}&code={CODE}", "not a valid DNS name"),
    (f"portunus://-edge.example.com:7443/enroll?pin=sha256:{FP}&code={CODE}", "not a valid DNS name"),
    (f"portunus://1.2.3.999:7443/enroll?pin=sha256:{FP}&code={CODE}", "not a valid IPv4"),
    (f"portunus://ed%67e:7443/enroll?pin=sha256:{FP}&code={CODE}", "may only contain"),
    (f"portunus://edge.example.com:7443?pin=sha256:{FP}&code={CODE}", "path must be /enroll, got ''"),
    (f"portunus://edge.example.com:7443/?pin=sha256:{FP}&code={CODE}", "path must be /enroll, got '/'"),
    (f"portunus://edge.example.com:7443/enrol?pin=sha256:{FP}&code={CODE}", "path must be /enroll, got '/enrol'"),
    (f"portunus://edge.example.com:7443/enroll/?pin=sha256:{FP}&code={CODE}", "path must be /enroll"),
    (f"portunus://edge.example.com:7443/v1/enroll?pin=sha256:{FP}&code={CODE}", "path must be /enroll"),
    ("portunus://edge.example.com:7443/enroll", "missing query"),
    ("portunus://edge.example.com:7443/enroll?", "missing query"),
    (f"portunus://edge.example.com:7443/enroll?code={CODE}", "missing pin"),
    (f"portunus://edge.example.com:7443/enroll?pin=&code={CODE}", "missing pin"),
    (f"portunus://edge.example.com:7443/enroll?pin={FP}&code={CODE}", "pin must be sha256:<64 hex digits>"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha1:{FP[:40]}&code={CODE}", "pin must be sha256:"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP[:63]}&code={CODE}", "pin must be sha256:"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP}0&code={CODE}", "pin must be sha256:"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP[:62]}zz&code={CODE}", "pin must be sha256:"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP}", "missing code"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP}&code=", "missing code"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP}&code={CODE}&code={CODE}", "more than once"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP}&pin=sha256:{FP}&code={CODE}", "more than once"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP}&code={CODE}&extra=1",
     "unexpected query parameter 'extra'"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP}&{CODE}", "has no '='"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP}&code={CODE}&", "has no '='"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP}&code={CODE}#frag", "fragment"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP}&code={CODE}?x", "not allowed"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP}&code={CODE}%zz", "not allowed"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP}&code={CODE}%ff", "not valid percent-encoded UTF-8"),
    (f"portunus://edge.example.com:7443/enroll?pin=sha256:{FP}&code={CODE}%20", "whitespace"),
    (f" {GOOD}", "whitespace"),
    (f"{GOOD} ", "whitespace"),
    (f"{GOOD}\n", "whitespace"),
    (f"'{GOOD}'", "scheme must be portunus://"),
    (GOOD.replace("enroll?", "enroll?\t"), "whitespace"),
    (GOOD + "é", "non-ASCII"),
    (GOOD + "x" * 3000, "longer than"),
]


@pytest.mark.parametrize("uri,words", MALFORMED, ids=[f"{i}:{w}" for i, (_, w) in enumerate(MALFORMED)])
def test_malformed_uri_is_refused_naming_what_is_wrong(uri, words):
    with pytest.raises(PortunusError) as ei:
        parse_uri(uri)
    e = ei.value
    assert e.code == "validation.enrollment_uri_invalid"
    assert words in e.message
    assert (e.http_status, e.exit_code) == (400, 2)
    # the one-time code is a secret: never echoed
    assert CODE not in e.message and CODE not in str(e) and CODE not in json.dumps(e.to_json())


def test_non_string_uri_is_refused():
    with pytest.raises(PortunusError) as ei:
        parse_uri(None)
    assert ei.value.code == "validation.enrollment_uri_invalid"


@pytest.mark.parametrize("args,words", [
    (("::1", 7443, FP, CODE), "IPv6 literal"),
    (("edge", 0, FP, CODE), "port 0"),
    (("edge", 70000, FP, CODE), "port 70000"),
    (("edge", "7443", FP, CODE), "port '7443'"),
    (("edge", True, FP, CODE), "port True"),
    (("", 7443, FP, CODE), "missing host"),
    (("edge host", 7443, FP, CODE), "may only contain"),
    (("edge", 7443, "abc", CODE), "64 hex"),
    (("edge", 7443, FP, ""), "code <redacted>"),
    (("edge", 7443, FP, "with space"), "code <redacted>"),
])
def test_make_uri_refuses_what_parse_uri_would_refuse(args, words):
    with pytest.raises(PortunusError) as ei:
        make_uri(*args)
    assert ei.value.code == "validation.enrollment_uri_invalid"
    assert words in ei.value.message
    assert "with space" not in ei.value.message


def test_make_uri_accepts_a_sha256_prefixed_fingerprint():
    assert make_uri("edge.example.com", 7443, "sha256:" + FP, CODE) == GOOD


# ------------------------------------------------------------------ enroll command

def test_enroll_command_single_quotes_the_uri():
    cmd = enroll_command(GOOD)
    assert cmd == f"portunus-client enroll '{GOOD}'"
    assert shlex.split(cmd) == ["portunus-client", "enroll", GOOD]
    assert enroll_command(parse_uri(GOOD)) == cmd


def test_enroll_command_survives_a_real_shell():
    uri = make_uri("edge.example.com", 7443, FP, "it's&$(x)`y`;|*")
    cmd = enroll_command(uri)
    assert shlex.split(cmd)[2] == uri
    script = 'portunus_client() { printf "%s" "$2"; }; ' + cmd.replace("portunus-client", "portunus_client", 1)
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10, check=True).stdout
    assert out == uri
    assert parse_uri(out).code == "it's&$(x)`y`;|*"


def test_enroll_command_quotes_even_an_embedded_single_quote():
    cmd = enroll_command("a'b")
    assert shlex.split(cmd) == ["portunus-client", "enroll", "a'b"]


# ------------------------------------------------------------------ bundle file

def bundle(**over) -> dict:
    b = {"version": 1, "client_id": "01J8ZQ4V6W7X8Y9ZABCDEFGHJK", "client_name": "edge 1",
         "server_endpoint": "portunus.example.com:7443", "server_cert_sha256": FP, "token": TOKEN}
    b.update(over)
    return b


def test_write_then_read_round_trips_with_mode_0600(tmp_path):
    path = tmp_path / "client.bundle.json"
    write_bundle(str(path), bundle())
    assert mode_of(path) == 0o600
    on_disk = json.loads(path.read_text())
    assert list(on_disk) == ["version", "client_id", "client_name", "server_endpoint", "server_cert_sha256", "token"]
    assert on_disk == bundle()
    assert read_bundle(str(path)) == bundle()
    assert os.listdir(tmp_path) == ["client.bundle.json"]  # no temp file left


def test_write_is_0600_even_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        path = tmp_path / "new" / "dir" / "b.json"
        write_bundle(str(path), bundle())
    finally:
        os.umask(old)
    assert mode_of(path) == 0o600
    assert mode_of(tmp_path / "new") == 0o700
    assert mode_of(tmp_path / "new" / "dir") == 0o700


def test_write_replaces_an_existing_looser_bundle_with_a_0600_one(tmp_path):
    path = tmp_path / "b.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    write_bundle(str(path), bundle(client_name="renamed"))
    assert mode_of(path) == 0o600
    assert read_bundle(str(path))["client_name"] == "renamed"


def test_existing_parent_dir_permissions_are_left_alone(tmp_path):
    d = tmp_path / "shared"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    write_bundle(str(d / "b.json"), bundle())
    assert mode_of(d) == 0o755


def test_write_fills_in_version_and_drops_unknown_keys(tmp_path):
    path = tmp_path / "b.json"
    b = bundle()
    del b["version"]
    write_bundle(str(path), {**b, "extra": 1})
    assert json.loads(path.read_text()) == bundle()


def test_write_refuses_an_invalid_bundle_and_writes_nothing(tmp_path):
    path = tmp_path / "b.json"
    with pytest.raises(PortunusError) as ei:
        write_bundle(str(path), bundle(server_cert_sha256="nope"))
    assert ei.value.code == "bundle_invalid"
    assert not path.exists()


def test_read_normalizes_the_fingerprint_case(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(bundle(server_cert_sha256=FP.upper())))
    assert read_bundle(str(path))["server_cert_sha256"] == FP


BAD_BUNDLES = [
    # (json text, words the message must contain)
    ("{", "not valid JSON"),
    ("", "not valid JSON"),
    ("[]", "expected a JSON object"),
    ('"x"', "expected a JSON object"),
    (json.dumps({k: v for k, v in bundle().items() if k != "token"}), "missing field(s) token"),
    (json.dumps({"version": 1}), "missing field(s) client_id, client_name, server_endpoint, server_cert_sha256, token"),
    (json.dumps(bundle(version=2)), "field 'version' must be 1, got 2"),
    (json.dumps(bundle(version="1")), "field 'version' must be 1, got '1'"),
    (json.dumps(bundle(version=True)), "field 'version' must be 1"),
    (json.dumps(bundle(client_id="")), "field 'client_id'"),
    (json.dumps(bundle(client_id="a b")), "field 'client_id'"),
    (json.dumps(bundle(client_id=5)), "field 'client_id'"),
    (json.dumps(bundle(client_name="")), "field 'client_name'"),
    (json.dumps(bundle(client_name=None)), "field 'client_name'"),
    (json.dumps(bundle(server_endpoint="portunus.example.com")), "field 'server_endpoint': missing port"),
    (json.dumps(bundle(server_endpoint="[::1]:7443")), "field 'server_endpoint': IPv6 literal"),
    (json.dumps(bundle(server_endpoint="https://x:7443")), "field 'server_endpoint'"),
    (json.dumps(bundle(server_endpoint=7443)), "field 'server_endpoint'"),
    (json.dumps(bundle(server_cert_sha256="sha256:" + FP)), "field 'server_cert_sha256' must be 64 hex"),
    (json.dumps(bundle(server_cert_sha256=FP[:-1])), "field 'server_cert_sha256'"),
    (json.dumps(bundle(token="")), "field 'token'"),
    (json.dumps(bundle(token=None)), "field 'token'"),
    (json.dumps(bundle(token=TOKEN + " tail")), "field 'token'"),
    ('{"version": 1, "token": "' + TOKEN + '", ', "not valid JSON"),
]


@pytest.mark.parametrize("text,words", BAD_BUNDLES, ids=[f"{i}:{w}" for i, (_, w) in enumerate(BAD_BUNDLES)])
def test_read_refuses_a_bad_bundle_naming_path_and_field_never_the_token(tmp_path, text, words):
    path = tmp_path / "b.json"
    path.write_text(text)
    os.chmod(path, 0o600)
    with pytest.raises(PortunusError) as ei:
        read_bundle(str(path))
    e = ei.value
    assert e.code == "bundle_invalid"
    assert e.exit_code == 1
    assert str(path) in e.message
    assert words in e.message
    assert TOKEN not in str(e) and TOKEN not in json.dumps(e.to_json())


def test_read_refuses_non_utf8_and_directories(tmp_path):
    path = tmp_path / "b.json"
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(PortunusError) as ei:
        read_bundle(str(path))
    assert ei.value.code == "bundle_invalid" and "UTF-8" in ei.value.message
    with pytest.raises(PortunusError) as ei:
        read_bundle(str(tmp_path))
    assert ei.value.code == "bundle_invalid" and "directory" in ei.value.message


def test_read_missing_file_is_bundle_not_found(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(PortunusError) as ei:
        read_bundle(path)
    assert ei.value.code == "bundle_not_found"
    assert path in ei.value.message
    assert ei.value.exit_code == 1


def test_read_of_a_loose_bundle_warns_without_the_token(tmp_path, monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(log, "stream", buf)
    monkeypatch.setattr(log, "fmt", "json")
    path = tmp_path / "b.json"
    write_bundle(str(path), bundle())
    os.chmod(path, 0o644)
    assert read_bundle(str(path))["token"] == TOKEN
    recs = [json.loads(line) for line in buf.getvalue().splitlines()]
    [warn] = [r for r in recs if r["event"] == "bundle.permissions_loose"]
    assert warn["mode"] == "0644" and warn["path"] == str(path)
    assert TOKEN not in buf.getvalue()
    assert not [r for r in recs if r["event"] == "audit.redaction_violation"]


# ------------------------------------------------------------------ lookup

def test_search_order_with_every_variable_set(tmp_path):
    env = {"PORTUNUS_CLIENT_BUNDLE": "/etc/portunus/b.json", "XDG_CONFIG_HOME": "/xdg", "HOME": "/home/u"}
    assert bundle_search_paths(env) == [
        "/etc/portunus/b.json",
        "/xdg/portunus/client.bundle.json",
        "/home/u/.config/portunus/client.bundle.json",
        "./client.bundle.json",
    ]


@pytest.mark.parametrize("env,expected", [
    ({"HOME": "/home/u"}, ["/home/u/.config/portunus/client.bundle.json", "./client.bundle.json"]),
    ({"HOME": "/home/u", "PORTUNUS_CLIENT_BUNDLE": "", "XDG_CONFIG_HOME": ""},
     ["/home/u/.config/portunus/client.bundle.json", "./client.bundle.json"]),
    ({"HOME": "/home/u", "XDG_CONFIG_HOME": "relative/dir"},
     ["/home/u/.config/portunus/client.bundle.json", "./client.bundle.json"]),
    ({"HOME": "/home/u", "XDG_CONFIG_HOME": "/home/u/.config"},
     ["/home/u/.config/portunus/client.bundle.json", "./client.bundle.json"]),
    ({"HOME": "/home/u", "PORTUNUS_CLIENT_BUNDLE": "mine.json"},
     ["mine.json", "/home/u/.config/portunus/client.bundle.json", "./client.bundle.json"]),
])
def test_search_order_skips_unset_and_duplicate_entries(env, expected):
    assert bundle_search_paths(env) == expected


@pytest.fixture
def lookup_env(tmp_path, monkeypatch):
    """Four real candidate locations under tmp_path, none existing yet; cwd is tmp_path/cwd."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    env = {"PORTUNUS_CLIENT_BUNDLE": str(tmp_path / "explicit" / "b.json"),
           "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
           "HOME": str(tmp_path / "home")}
    candidates = bundle_search_paths(env)
    assert len(candidates) == 4
    return env, candidates


@pytest.mark.parametrize("present", [[0, 1, 2, 3], [1, 2, 3], [2, 3], [3], [1, 3], [0, 2]])
def test_find_bundle_returns_the_first_existing_candidate(lookup_env, present):
    env, candidates = lookup_env
    for i in present:
        write_bundle(candidates[i], bundle(client_name=f"c{i}"))
    found = find_bundle(None, env)
    assert found == candidates[min(present)]
    assert read_bundle(found)["client_name"] == f"c{min(present)}"


def test_find_bundle_error_lists_every_path_tried(lookup_env):
    env, candidates = lookup_env
    with pytest.raises(PortunusError) as ei:
        find_bundle(None, env)
    e = ei.value
    assert e.code == "bundle_not_found"
    assert e.exit_code == 1
    for p in candidates:
        assert p in e.message
    assert e.fields["tried"] == candidates
    # listed in lookup order
    positions = [e.message.index(p) for p in candidates]
    assert positions == sorted(positions)


def test_find_bundle_skips_a_directory_in_the_way(lookup_env):
    env, candidates = lookup_env
    os.makedirs(candidates[0])
    write_bundle(candidates[2], bundle())
    assert find_bundle(None, env) == candidates[2]


def test_explicit_bundle_wins_over_the_search(lookup_env, tmp_path):
    env, candidates = lookup_env
    write_bundle(candidates[0], bundle())
    explicit = str(tmp_path / "given.json")
    write_bundle(explicit, bundle())
    assert find_bundle(explicit, env) == explicit


def test_missing_explicit_bundle_is_not_found_and_does_not_fall_back(lookup_env, tmp_path):
    env, candidates = lookup_env
    write_bundle(candidates[0], bundle())
    explicit = str(tmp_path / "given.json")
    with pytest.raises(PortunusError) as ei:
        find_bundle(explicit, env)
    assert ei.value.code == "bundle_not_found"
    assert explicit in ei.value.message and "does not exist" in ei.value.message
    assert ei.value.fields["tried"] == [explicit]
    with pytest.raises(PortunusError) as ei:
        find_bundle(str(tmp_path), env)
    assert "is not a file" in ei.value.message


@pytest.mark.parametrize("env,expected", [
    ({"XDG_CONFIG_HOME": "/xdg", "HOME": "/home/u"}, "/xdg/portunus/client.bundle.json"),
    ({"HOME": "/home/u"}, "/home/u/.config/portunus/client.bundle.json"),
    ({"XDG_CONFIG_HOME": "", "HOME": "/home/u"}, "/home/u/.config/portunus/client.bundle.json"),
])
def test_default_bundle_path(env, expected):
    assert default_bundle_path(env) == expected


def test_default_bundle_path_is_found_by_the_search(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"HOME": str(tmp_path / "home")}
    write_bundle(default_bundle_path(env), bundle())
    assert find_bundle(None, env) == default_bundle_path(env)
    assert mode_of(tmp_path / "home" / ".config" / "portunus") == 0o700
