"""The control modules `client enroll` and the client's start import keep their records as plain
classes (issue 15, startup: importing dataclasses is ~43 M instructions, a dataclass ~1.5 M to
create). The behaviour the dataclasses had stays: values, equality, immutability, a repr that
never shows the enrollment code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from portunus.control import enrollment, messages, tls
from portunus.control.enrollment import EnrollmentURI
from portunus.control.tls import CertInfo

CONTROL = Path(__file__).resolve().parents[2] / "portunus" / "control"
FP = "ab" * 32


@pytest.mark.parametrize("module", ["redeem", "enrollment", "tls", "messages", "frames", "selfsigned"])
def test_the_enroll_path_modules_do_not_import_dataclasses(module):
    tree = ast.parse((CONTROL / f"{module}.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "dataclasses" not in imported and "typing" not in imported


def test_an_enrollment_uri_is_a_value_that_hides_its_code():
    a = EnrollmentURI(host="h", port=1, fingerprint=FP, code="SECRET-CODE")
    b = EnrollmentURI("h", 1, FP, "SECRET-CODE")
    assert a == b and hash(a) == hash(b) and a != EnrollmentURI("h", 1, FP, "OTHER")
    assert (a.host, a.port, a.fingerprint, a.code, a.endpoint) == ("h", 1, FP, "SECRET-CODE", "h:1")
    assert "SECRET" not in repr(a) and "h" in repr(a)
    with pytest.raises(AttributeError):
        a.code = "x"
    with pytest.raises(AttributeError):
        del a.host
    parsed = enrollment.parse_uri(a.to_uri())
    assert parsed == a


def test_cert_info_defaults_are_fresh_lists_and_compare_by_value():
    x, y = CertInfo("c", "k", FP), CertInfo(cert_path="c", key_path="k", fingerprint=FP)
    assert x == y and x.sans_dns == [] and x.sans_ip == [] and x.generated is False
    x.sans_dns.append("edge")
    assert y.sans_dns == [] and x != y
    assert CertInfo("c", "k", FP, ["d"], ["127.0.0.1"], True).sans_ip == ["127.0.0.1"]
    assert "fingerprint=" in repr(x)
    with pytest.raises(TypeError):
        hash(x)


def test_message_schemas_still_validate():
    kinds = [getattr(messages, n) for n in dir(messages) if n.startswith("_") and isinstance(getattr(messages, n), messages._Kind)]
    assert kinds and all(callable(k.accepts) for k in kinds)
    assert messages._STR.accepts("x") and not messages._STR.accepts(1)
    hello = messages.hello("tok", "1.0")
    assert messages.validate(dict(hello), "client")["type"] == "hello"
    with pytest.raises(Exception):
        messages.validate({**hello, "token": 5}, "client")     # the field's kind still decides
    assert tls.CertInfo is CertInfo
