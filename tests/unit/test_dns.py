"""The DNS stub codec (SPEC §2.5): exact query bytes, hand-built responses, and hostile packets.

Responses are assembled byte by byte here (not by the codec, not by the test
server) so that compression pointers, CNAME chains and broken lengths are
exactly what each test says.
"""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from portunus.relay.dns import (
    QTYPE_A,
    QTYPE_AAAA,
    QTYPE_CNAME,
    DnsAnswer,
    DnsError,
    TcpReader,
    build_query,
    frame_tcp,
    parse_response,
    read_hosts,
    read_resolv_conf,
)

SOA, OPT = 6, 41
IN, CH = 1, 3
QR, AA, TC, RD, RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080


# ------------------------------------------------------------------ packet building

def wire(name: str) -> bytes:
    """Uncompressed wire form of a dotted name."""
    out = b""
    for label in name.rstrip(".").split(".") if name.strip(".") else []:
        out += bytes((len(label),)) + label.encode("latin-1")
    return out + b"\x00"


def ptr(offset: int) -> bytes:
    return struct.pack(">H", 0xC000 | offset)


def header(txid=0x1234, flags=QR | RD | RA, qd=1, an=0, ns=0, ar=0) -> bytes:
    return struct.pack(">HHHHHH", txid, flags, qd, an, ns, ar)


def question(name="example.com", qtype=QTYPE_A, qclass=IN) -> bytes:
    return wire(name) + struct.pack(">HH", qtype, qclass)


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes, rclass: int = IN) -> bytes:
    return owner + struct.pack(">HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def a(addr: str) -> bytes:
    return bytes(int(x) for x in addr.split("."))


def soa_rdata(minimum: int) -> bytes:
    return wire("ns.example.com") + wire("hostmaster.example.com") + struct.pack(">IIIII", 1, 3600, 600, 86400,
                                                                                  minimum)


def response(answers=(), authority=(), additional=(), txid=0x1234, flags=QR | RD | RA, q=None) -> bytes:
    q = question() if q is None else q
    return (header(txid, flags, 1, len(answers), len(authority), len(additional)) + q
            + b"".join(answers) + b"".join(authority) + b"".join(additional))


QNAME_AT = 12  # the question name always starts right after the header


def parse(data: bytes, name="example.com", qtype=QTYPE_A, txid=0x1234) -> DnsAnswer:
    return parse_response(data, txid, name, qtype)


def error_code(data: bytes, **kw) -> str:
    with pytest.raises(DnsError) as info:
        parse(data, **kw)
    return info.value.code


# ------------------------------------------------------------------ queries

def test_query_bytes_are_exact():
    assert build_query("example.com", QTYPE_A, 0x1234) == bytes.fromhex(
        "1234" "0100" "0001" "0000" "0000" "0000"   # id, RD only, one question
        "07" "6578616d706c65" "03" "636f6d" "00"     # example.com
        "0001" "0001")                                # A, IN


def test_aaaa_and_cname_query_types():
    assert build_query("example.com", QTYPE_AAAA, 0)[-4:] == b"\x00\x1c\x00\x01"
    assert build_query("example.com", QTYPE_CNAME, 0)[-4:] == b"\x00\x05\x00\x01"
    assert (QTYPE_A, QTYPE_AAAA, QTYPE_CNAME) == (1, 28, 5)


def test_query_id_and_flags():
    q = build_query("a.b", QTYPE_A, 0xBEEF)
    assert q[:4] == b"\xbe\xef\x01\x00"
    assert build_query("a.b", QTYPE_A, 0)[:2] == b"\x00\x00"
    assert build_query("a.b", QTYPE_A, 0xFFFF)[:2] == b"\xff\xff"


def test_trailing_dot_is_the_same_name_and_case_is_kept():
    assert build_query("example.com.", QTYPE_A, 1) == build_query("example.com", QTYPE_A, 1)
    assert b"\x07ExAmPlE" in build_query("ExAmPlE.com", QTYPE_A, 1)


@pytest.mark.parametrize("name", [
    "localhost", "a", "_sip._tcp.example.com", "xn--bcher-kva.de", "0-9.a-b_c", "-lead.example",
    "a" * 63 + ".com", ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61]),  # exactly 253
])
def test_valid_names(name):
    q = build_query(name, QTYPE_A, 7)
    assert q[12:-4] == wire(name)


@pytest.mark.parametrize("name", [
    "", ".", "..", "a..b", ".a", "a" * 64 + ".com", ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 62]),
    "exa mple.com", "ex/ample.com", "bücher.de", "a.b\x00", "a*b.com", "*.example.com", "a,b", "a\\.b",
])
def test_bad_names(name):
    with pytest.raises(DnsError) as info:
        build_query(name, QTYPE_A, 1)
    assert info.value.code == "bad_name"


def test_bad_name_that_is_not_a_string():
    with pytest.raises(DnsError) as info:
        build_query(b"example.com", QTYPE_A, 1)
    assert info.value.code == "bad_name"


@pytest.mark.parametrize("txid", [-1, 0x10000, 1.5, None])
def test_txid_out_of_range(txid):
    with pytest.raises(ValueError):
        build_query("example.com", QTYPE_A, txid)


@pytest.mark.parametrize("qtype", [0, -1, 0x10000])
def test_qtype_out_of_range(qtype):
    with pytest.raises(ValueError):
        build_query("example.com", qtype, 1)


def test_dns_error_codes_are_closed():
    err = DnsError("servfail", "x")
    assert (err.code, err.message) == ("servfail", "x")
    with pytest.raises(ValueError):
        DnsError("nope", "x")


# ------------------------------------------------------------------ plain answers

def test_single_a_record_with_pointer_to_question():
    ans = parse(response([rr(ptr(QNAME_AT), QTYPE_A, 300, a("93.184.216.34"))]))
    assert ans == DnsAnswer(addresses=["93.184.216.34"], ttl=300, rcode=0, truncated=False)


def test_uncompressed_owner_name_works_too():
    ans = parse(response([rr(wire("example.com"), QTYPE_A, 60, a("10.0.0.1"))]))
    assert ans.addresses == ["10.0.0.1"] and ans.ttl == 60


def test_several_addresses_keep_order_drop_duplicates_and_take_min_ttl():
    ans = parse(response([
        rr(ptr(QNAME_AT), QTYPE_A, 300, a("10.0.0.3")),
        rr(ptr(QNAME_AT), QTYPE_A, 120, a("10.0.0.1")),
        rr(ptr(QNAME_AT), QTYPE_A, 200, a("10.0.0.3")),
        rr(ptr(QNAME_AT), QTYPE_A, 500, a("10.0.0.2")),
    ]))
    assert ans.addresses == ["10.0.0.3", "10.0.0.1", "10.0.0.2"]
    assert ans.ttl == 120


def test_aaaa_is_canonical_text():
    raw = bytes.fromhex("20010db8000000000000000000000001")
    ans = parse(response([rr(ptr(QNAME_AT), QTYPE_AAAA, 30, raw)], q=question(qtype=QTYPE_AAAA)),
                qtype=QTYPE_AAAA)
    assert ans.addresses == ["2001:db8::1"]
    mapped = bytes(10) + b"\xff\xff" + a("192.0.2.1")
    ans = parse(response([rr(ptr(QNAME_AT), QTYPE_AAAA, 30, mapped)], q=question(qtype=QTYPE_AAAA)),
                qtype=QTYPE_AAAA)
    assert ans.addresses == [str(ipaddress.IPv6Address(mapped))]  # the notation changed in 3.13


def test_records_of_other_types_classes_and_names_are_ignored():
    ans = parse(response([
        rr(ptr(QNAME_AT), QTYPE_AAAA, 10, bytes(16)),                  # not the type asked
        rr(ptr(QNAME_AT), QTYPE_A, 10, a("6.6.6.6"), rclass=CH),      # not IN
        rr(wire("evil.example"), QTYPE_A, 10, a("6.6.6.7")),           # not our name
        rr(ptr(QNAME_AT), 16, 10, b"\x03txt"),                         # TXT
        rr(ptr(QNAME_AT), QTYPE_A, 90, a("192.0.2.7")),
    ]))
    assert ans.addresses == ["192.0.2.7"] and ans.ttl == 90


def test_ttl_with_top_bit_set_reads_as_zero():
    ans = parse(response([rr(ptr(QNAME_AT), QTYPE_A, 0x80000000, a("10.0.0.1"))]))
    assert ans.ttl == 0
    assert parse(response([rr(ptr(QNAME_AT), QTYPE_A, 0x7FFFFFFF, a("10.0.0.1"))])).ttl == 0x7FFFFFFF


def test_ttl_zero_is_kept():
    assert parse(response([rr(ptr(QNAME_AT), QTYPE_A, 0, a("10.0.0.1"))])).ttl == 0


def test_additional_section_with_opt_record_is_parsed_and_ignored():
    opt = b"\x00" + struct.pack(">HHIH", OPT, 1232, 0, 0)
    ans = parse(response([rr(ptr(QNAME_AT), QTYPE_A, 60, a("10.0.0.1"))], additional=[opt]))
    assert ans.addresses == ["10.0.0.1"]


def test_trailing_bytes_after_the_last_section_are_tolerated():
    ans = parse(response([rr(ptr(QNAME_AT), QTYPE_A, 60, a("10.0.0.1"))]) + b"\x00\x00")
    assert ans.addresses == ["10.0.0.1"]


def test_question_name_is_matched_without_case():
    data = response([rr(ptr(QNAME_AT), QTYPE_A, 60, a("10.0.0.1"))], q=question("ExAMple.CoM"))
    assert parse(data, name="example.com").addresses == ["10.0.0.1"]
    assert parse(data, name="EXAMPLE.com.").addresses == ["10.0.0.1"]
    # answers owned by a differently cased name still belong to us
    data = response([rr(wire("EXAMPLE.COM"), QTYPE_A, 60, a("10.0.0.2"))])
    assert parse(data).addresses == ["10.0.0.2"]


def test_bytearray_and_memoryview_input():
    data = response([rr(ptr(QNAME_AT), QTYPE_A, 60, a("10.0.0.1"))])
    assert parse(bytearray(data)).addresses == ["10.0.0.1"]
    assert parse(memoryview(data)).addresses == ["10.0.0.1"]


def test_round_trip_with_build_query():
    q = build_query("Host.Example.ORG", QTYPE_AAAA, 4242)
    flags = struct.unpack_from(">H", q, 2)[0] | QR | RA
    data = struct.pack(">HHHHHH", 4242, flags, 1, 1, 0, 0) + q[12:] \
        + rr(ptr(QNAME_AT), QTYPE_AAAA, 77, bytes.fromhex("fd000000000000000000000000000010"))
    ans = parse_response(data, 4242, "host.example.org", QTYPE_AAAA)
    assert ans.addresses == ["fd00::10"] and ans.ttl == 77


# ------------------------------------------------------------------ compression

def test_pointer_to_a_suffix_of_the_question():
    # "www" + pointer to "example.com" inside the question
    www = b"\x03www" + ptr(QNAME_AT)
    data = response([rr(ptr(QNAME_AT), QTYPE_CNAME, 50, www),
                     rr(ptr(len(header()) + len(question()) + 12), QTYPE_A, 70, a("10.1.1.1"))])
    ans = parse(data)
    assert ans.addresses == ["10.1.1.1"] and ans.ttl == 50


def test_pointer_chains_through_several_names():
    # question example.com; CNAME rdata "b" -> ptr to "com" (offset 20); next owner points at that rdata;
    # its CNAME target "c" -> pointer to the first rdata (b.com) -> c.b.com
    q = question()
    com_at = QNAME_AT + 8
    first_rr = len(header()) + len(q)
    rdata1_at = first_rr + 2 + 10
    rdata1 = b"\x01b" + ptr(com_at)
    rr1 = rr(ptr(QNAME_AT), QTYPE_CNAME, 100, rdata1)
    rr2_at = first_rr + len(rr1)
    rdata2 = b"\x01c" + ptr(rdata1_at)
    rr2 = rr(ptr(rdata1_at), QTYPE_CNAME, 80, rdata2)
    rdata2_at = rr2_at + 2 + 10
    rr3 = rr(ptr(rdata2_at), QTYPE_A, 90, a("10.2.2.2"))
    ans = parse(response([rr1, rr2, rr3], q=q))
    assert ans.addresses == ["10.2.2.2"] and ans.ttl == 80
    cname = parse(response([rr1], q=question(qtype=QTYPE_CNAME)), qtype=QTYPE_CNAME)
    assert cname.addresses == ["b.com"] and cname.ttl == 100


def test_pointer_to_itself_is_refused():
    first_rr = len(header()) + len(question())
    assert error_code(response([rr(ptr(first_rr), QTYPE_A, 1, a("1.2.3.4"))])) == "malformed"


def test_pointer_loop_between_two_names_is_refused():
    first_rr = len(header()) + len(question())
    rdata_at = first_rr + 2 + 10
    # rdata "x" + pointer back to its own start: backwards, but it would loop
    data = response([rr(ptr(QNAME_AT), QTYPE_CNAME, 1, b"\x01x" + ptr(rdata_at))])
    assert error_code(data) == "malformed"


def test_forward_pointer_is_refused():
    first_rr = len(header()) + len(question())
    data = response([rr(ptr(first_rr + 2), QTYPE_A, 1, a("1.2.3.4"))])
    assert error_code(data) == "malformed"


def test_pointer_past_the_end_is_refused():
    data = response([rr(ptr(0x3FFF), QTYPE_A, 1, a("1.2.3.4"))])
    assert error_code(data) == "malformed"


@pytest.mark.parametrize("label_type", [0x40, 0x80])
def test_reserved_label_types_are_refused(label_type):
    data = response([rr(bytes((label_type | 1,)) + b"x\x00", QTYPE_A, 1, a("1.2.3.4"))])
    assert error_code(data) == "malformed"


def test_name_longer_than_255_octets_through_pointers_is_refused():
    # each CNAME target adds 60 octets in front of the previous one: the fifth passes 255
    q = question()
    rrs = []
    pos = len(header()) + len(q)
    prev_at = QNAME_AT
    owner = ptr(QNAME_AT)
    for i in range(5):
        rdata = bytes((59,)) + bytes([97 + i]) * 59 + ptr(prev_at)
        rec = rr(owner, QTYPE_CNAME, 10, rdata)
        rdata_at = pos + len(owner) + 10
        rrs.append(rec)
        pos += len(rec)
        owner = ptr(rdata_at)
        prev_at = rdata_at
    assert error_code(response(rrs, q=q)) == "malformed"
    # the first three (13 + 3 * 60 = 193 octets) are fine
    ans = parse(response(rrs[:3], q=q))
    assert ans.addresses == [] and ans.rcode == 0


# ------------------------------------------------------------------ CNAME chains

def chain_response(names, final_addrs, ttls, final_ttl=600, shuffle_seed=None, qtype=QTYPE_A):
    """example.com -> names[0] -> ... -> names[-1] (with A records), uncompressed."""
    owners = ["example.com"] + list(names)
    recs = [rr(wire(owners[i]), QTYPE_CNAME, ttls[i], wire(owners[i + 1])) for i in range(len(names))]
    recs += [rr(wire(owners[-1]), qtype, final_ttl, a(x)) for x in final_addrs]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(recs)
    return response(recs, q=question(qtype=qtype))


def test_cname_chain_is_followed_and_ttl_is_the_minimum():
    data = chain_response(["a.example.net", "b.example.org"], ["10.9.9.9"], [300, 40], final_ttl=120)
    ans = parse(data)
    assert ans.addresses == ["10.9.9.9"] and ans.ttl == 40


def test_address_ttl_can_be_the_minimum():
    data = chain_response(["a.example.net"], ["10.9.9.9", "10.9.9.8"], [300], final_ttl=15)
    assert parse(data).ttl == 15


def test_cname_chain_in_any_order():
    for seed in range(10):
        data = chain_response(["a.x", "b.x", "c.x"], ["10.0.0.1", "10.0.0.2"], [50, 60, 70], 80, shuffle_seed=seed)
        ans = parse(data)
        assert sorted(ans.addresses) == ["10.0.0.1", "10.0.0.2"] and ans.ttl == 50


def test_addresses_of_the_alias_itself_are_not_the_answer():
    # a record for an intermediate name of a chain that already moved on is ignored
    recs = [rr(wire("example.com"), QTYPE_CNAME, 60, wire("real.example")),
            rr(wire("other.example"), QTYPE_A, 60, a("6.6.6.6")),
            rr(wire("real.example"), QTYPE_A, 60, a("10.0.0.5"))]
    assert parse(response(recs)).addresses == ["10.0.0.5"]


def test_chain_with_eight_hops_is_followed():
    names = [f"h{i}.example" for i in range(8)]
    ans = parse(chain_response(names, ["10.0.0.8"], [100] * 8))
    assert ans.addresses == ["10.0.0.8"]


def test_chain_with_nine_hops_is_refused():
    names = [f"h{i}.example" for i in range(9)]
    assert error_code(chain_response(names, ["10.0.0.9"], [100] * 9)) == "malformed"


def test_cname_loop_is_refused():
    recs = [rr(wire("example.com"), QTYPE_CNAME, 60, wire("b.example")),
            rr(wire("b.example"), QTYPE_CNAME, 60, wire("c.example")),
            rr(wire("c.example"), QTYPE_CNAME, 60, wire("EXAMPLE.com"))]
    assert error_code(response(recs)) == "malformed"


def test_cname_to_itself_is_refused():
    recs = [rr(wire("example.com"), QTYPE_CNAME, 60, ptr(QNAME_AT))]
    assert error_code(response(recs)) == "malformed"


def test_chain_ending_without_data_is_nodata():
    recs = [rr(wire("example.com"), QTYPE_CNAME, 60, wire("b.example"))]
    soa = rr(wire("example"), SOA, 900, soa_rdata(45))
    ans = parse(response(recs, authority=[soa]))
    assert ans == DnsAnswer(addresses=[], ttl=45, rcode=0, truncated=False)
    assert parse(response(recs)) == DnsAnswer(addresses=[], ttl=None, rcode=0, truncated=False)


def test_cname_question_returns_the_target_name():
    recs = [rr(ptr(QNAME_AT), QTYPE_CNAME, 33, wire("Target.Example.NET"))]
    ans = parse(response(recs, q=question(qtype=QTYPE_CNAME)), qtype=QTYPE_CNAME)
    assert ans.addresses == ["Target.Example.NET"] and ans.ttl == 33


def test_cname_rdata_must_fill_its_length():
    recs = [rr(ptr(QNAME_AT), QTYPE_CNAME, 33, wire("t.example") + b"\x00")]
    assert error_code(response(recs)) == "malformed"


# ------------------------------------------------------------------ negative answers

def test_nxdomain_with_soa_gives_negative_ttl():
    soa = rr(wire("com"), SOA, 900, soa_rdata(60))
    ans = parse(response(authority=[soa], flags=QR | RD | RA | 3))
    assert ans == DnsAnswer(addresses=[], ttl=60, rcode=3, truncated=False)


def test_negative_ttl_is_the_smaller_of_soa_ttl_and_minimum():
    soa = rr(wire("com"), SOA, 20, soa_rdata(3600))
    assert parse(response(authority=[soa], flags=QR | 3)).ttl == 20


def test_nxdomain_without_soa_has_no_ttl():
    assert parse(response(flags=QR | RD | RA | 3)) == DnsAnswer(addresses=[], ttl=None, rcode=3, truncated=False)


def test_nxdomain_ignores_stray_answers():
    data = response([rr(ptr(QNAME_AT), QTYPE_A, 60, a("10.0.0.1"))], flags=QR | 3)
    assert parse(data).addresses == []


def test_nodata_with_and_without_soa():
    soa = rr(wire("com"), SOA, 300, soa_rdata(30))
    ns = rr(wire("com"), 2, 300, wire("a.gtld-servers.net"))
    assert parse(response(authority=[ns, soa])) == DnsAnswer(addresses=[], ttl=30, rcode=0, truncated=False)
    assert parse(response(authority=[ns])) == DnsAnswer(addresses=[], ttl=None, rcode=0, truncated=False)
    only_aaaa = [rr(ptr(QNAME_AT), QTYPE_AAAA, 60, bytes(16))]
    assert parse(response(only_aaaa, authority=[soa])).ttl == 30


def test_soa_with_compressed_names():
    rdata = b"\x02ns" + ptr(QNAME_AT + 8) + b"\x04host" + ptr(QNAME_AT + 8) + struct.pack(">IIIII", 1, 2, 3, 4, 12)
    soa = rr(ptr(QNAME_AT + 8), SOA, 100, rdata)
    assert parse(response(authority=[soa], flags=QR | 3)).ttl == 12


def test_soa_with_wrong_length_is_malformed():
    soa = rr(wire("com"), SOA, 100, soa_rdata(10)[:-1])
    assert error_code(response(authority=[soa], flags=QR | 3)) == "malformed"


# ------------------------------------------------------------------ error rcodes and mismatches

@pytest.mark.parametrize("rcode,code", [(2, "servfail"), (5, "refused"), (1, "unexpected"), (4, "unexpected"),
                                        (6, "unexpected"), (9, "unexpected"), (15, "unexpected")])
def test_error_rcodes(rcode, code):
    assert error_code(response(flags=QR | RD | RA | rcode)) == code


def test_wrong_id():
    data = response([rr(ptr(QNAME_AT), QTYPE_A, 60, a("10.0.0.1"))], txid=0x1235)
    assert error_code(data) == "mismatch"


def test_query_instead_of_response():
    data = response([rr(ptr(QNAME_AT), QTYPE_A, 60, a("10.0.0.1"))], flags=RD)
    assert error_code(data) == "mismatch"
    assert error_code(build_query("example.com", QTYPE_A, 0x1234)) == "mismatch"


def test_other_opcode():
    assert error_code(response(flags=QR | (2 << 11))) == "mismatch"


@pytest.mark.parametrize("q,kw", [
    (question("example.org"), {}),
    (question("www.example.com"), {}),
    (question("example.com", QTYPE_AAAA), {}),
    (question("example.com", QTYPE_A, CH), {}),
    (question("example.com"), {"name": "example.co"}),
])
def test_wrong_question(q, kw):
    assert error_code(response([rr(ptr(QNAME_AT), QTYPE_A, 60, a("10.0.0.1"))], q=q), **kw) == "mismatch"


@pytest.mark.parametrize("qd", [0, 2])
def test_question_count_must_be_one(qd):
    data = struct.pack(">HHHHHH", 0x1234, QR, qd, 0, 0, 0) + question() * qd
    assert error_code(data) == "mismatch"


def test_mismatch_is_checked_before_rcode():
    assert error_code(response(flags=QR | 2, txid=1)) == "mismatch"
    assert error_code(response(flags=QR | 2, q=question("other.example"))) == "mismatch"


def test_bad_name_argument():
    with pytest.raises(DnsError) as info:
        parse(response(), name="bad name")
    assert info.value.code == "bad_name"


def test_unsupported_qtype_argument():
    with pytest.raises(ValueError):
        parse(response(), qtype=16)


# ------------------------------------------------------------------ truncation (TC)

def test_tc_bit_marks_the_answer_truncated():
    data = response(flags=QR | TC | RD | RA)
    assert parse(data) == DnsAnswer(addresses=[], ttl=None, rcode=0, truncated=True)


def test_tc_answer_records_are_not_trusted():
    # a TC response may end mid-record; whatever it carries is not read
    full = response([rr(ptr(QNAME_AT), QTYPE_A, 60, a("10.0.0.1")), rr(ptr(QNAME_AT), QTYPE_A, 60, a("10.0.0.2"))],
                    flags=QR | TC)
    assert parse(full[:-3]) == DnsAnswer(addresses=[], ttl=None, rcode=0, truncated=True)


def test_tc_still_checks_the_question_and_rcode():
    assert error_code(response(flags=QR | TC, q=question("x.example"))) == "mismatch"
    assert error_code(response(flags=QR | TC | 2)) == "servfail"


# ------------------------------------------------------------------ broken packets

def valid_responses() -> list[tuple[bytes, str, int]]:
    """Well-formed responses that exercise every part of the parser, with their question."""
    q = question()
    first_rr = len(header()) + len(q)
    rdata1_at = first_rr + 2 + 10
    rr1 = rr(ptr(QNAME_AT), QTYPE_CNAME, 100, b"\x03www\x03cdn" + ptr(QNAME_AT + 8))
    rr2 = rr(ptr(rdata1_at), QTYPE_A, 50, a("10.0.0.1"))
    rr3 = rr(ptr(rdata1_at), QTYPE_A, 50, a("10.0.0.2"))
    opt = b"\x00" + struct.pack(">HHIH", OPT, 1232, 0, 0)
    compressed = response([rr1, rr2, rr3], additional=[opt], q=q)
    nx = response(authority=[rr(ptr(QNAME_AT + 8), SOA, 600, soa_rdata(60))], flags=QR | 3)
    v6 = response([rr(ptr(QNAME_AT), QTYPE_AAAA, 9, bytes(15) + b"\x01")], q=question(qtype=QTYPE_AAAA))
    chain = chain_response(["a.x", "b.x"], ["10.0.0.3"], [30, 40])
    return [(compressed, "example.com", QTYPE_A), (nx, "example.com", QTYPE_A),
            (v6, "example.com", QTYPE_AAAA), (chain, "example.com", QTYPE_A)]


def test_valid_responses_parse():
    results = [parse(d, name=n, qtype=t) for d, n, t in valid_responses()]
    assert results[0].addresses == ["10.0.0.1", "10.0.0.2"] and results[0].ttl == 50
    assert results[1] == DnsAnswer([], 60, 3, False)
    assert results[2].addresses == ["::1"]
    assert results[3].addresses == ["10.0.0.3"] and results[3].ttl == 30


@pytest.mark.parametrize("index", range(4))
def test_cut_at_every_offset_is_malformed_not_a_crash(index):
    data, name, qtype = valid_responses()[index]
    for cut in range(len(data)):
        with pytest.raises(DnsError) as info:
            parse_response(data[:cut], 0x1234, name, qtype)
        assert info.value.code == "malformed", (cut, info.value)


@pytest.mark.parametrize("rtype,size", [(QTYPE_A, 3), (QTYPE_A, 5), (QTYPE_A, 0), (QTYPE_AAAA, 4),
                                        (QTYPE_AAAA, 17)])
def test_address_record_of_the_wrong_size(rtype, size):
    data = response([rr(ptr(QNAME_AT), rtype, 60, bytes(size))], q=question(qtype=rtype))
    assert error_code(data, qtype=rtype) == "malformed"


def test_rdlength_past_the_end():
    data = response([rr(ptr(QNAME_AT), QTYPE_A, 60, a("10.0.0.1"))])
    data = data[:-6] + b"\x00\x05" + data[-4:]
    assert error_code(data) == "malformed"


def test_counts_larger_than_the_records():
    data = response([rr(ptr(QNAME_AT), QTYPE_A, 60, a("10.0.0.1"))])
    assert error_code(data[:6] + b"\x00\x02" + data[8:]) == "malformed"
    assert error_code(data[:8] + b"\xff\xff" + data[10:]) == "malformed"


def test_random_garbage_only_raises_dns_error():
    rng = random.Random(20240601)
    for _ in range(3000):
        size = rng.randrange(0, 300)
        data = bytes(rng.getrandbits(8) for _ in range(size))
        if rng.random() < 0.5 and size >= 4:
            # give it our id and a QR bit so it reaches the deeper parts
            data = b"\x12\x34" + bytes((data[2] | 0x80,)) + data[3:]
        try:
            parse_response(data, 0x1234, "example.com", rng.choice((QTYPE_A, QTYPE_AAAA, QTYPE_CNAME)))
        except DnsError:
            pass


def test_mutated_valid_responses_only_raise_dns_error():
    rng = random.Random(7)
    samples = valid_responses()
    outcomes = {"ok": 0, "error": 0}
    for _ in range(6000):
        data, name, qtype = rng.choice(samples)
        buf = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            pos = rng.randrange(len(buf))
            choice = rng.random()
            if choice < 0.6:
                buf[pos] = rng.getrandbits(8)
            elif choice < 0.8:
                buf[pos] = rng.choice((0xC0, 0xC0 | rng.randrange(64), 0x3F, 0x40, 0x80, 0x00, 0xFF))
            elif choice < 0.9:
                del buf[pos]
            else:
                buf.insert(pos, rng.getrandbits(8))
        try:
            ans = parse_response(bytes(buf), 0x1234, name, qtype)
        except DnsError as exc:
            assert exc.code in {"malformed", "mismatch", "servfail", "refused", "unexpected"}
            outcomes["error"] += 1
        else:
            assert isinstance(ans, DnsAnswer)
            assert ans.ttl is None or 0 <= ans.ttl <= 0x7FFFFFFF
            outcomes["ok"] += 1
    assert outcomes["ok"] and outcomes["error"]


# ------------------------------------------------------------------ TCP framing

def test_frame_tcp():
    assert frame_tcp(b"abc") == b"\x00\x03abc"
    assert frame_tcp(b"") == b"\x00\x00"
    assert frame_tcp(bytes(0xFFFF))[:2] == b"\xff\xff"
    with pytest.raises(ValueError):
        frame_tcp(bytes(0x10000))


def test_tcp_reader_byte_by_byte():
    msg = response([rr(ptr(QNAME_AT), QTYPE_A, 60, a("10.0.0.1"))])
    framed = frame_tcp(msg)
    reader = TcpReader()
    out = [reader.feed(framed[i:i + 1]) for i in range(len(framed))]
    assert out[:-1] == [None] * (len(framed) - 1)
    assert out[-1] == msg
    assert reader.buffered == 0
    assert reader.feed(b"") is None


def test_tcp_reader_several_messages_in_one_chunk():
    reader = TcpReader()
    assert reader.feed(frame_tcp(b"one") + frame_tcp(b"two") + frame_tcp(b"thr")[:3]) == b"one"
    assert reader.feed(b"") == b"two"
    assert reader.feed(b"") is None
    assert reader.feed(b"h") is None
    assert reader.feed(b"r") == b"thr"
    assert reader.feed(b"\x00") is None
    assert reader.feed(b"\x00") == b""


def test_tcp_reader_then_parse():
    msg = response([rr(ptr(QNAME_AT), QTYPE_A, 60, a("10.0.0.1"))])
    reader = TcpReader()
    framed = frame_tcp(msg)
    assert reader.feed(framed[:5]) is None
    assert parse(reader.feed(framed[5:])).addresses == ["10.0.0.1"]


# ------------------------------------------------------------------ resolv.conf and hosts

def test_resolv_conf(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text(
        "# generated by something\n"
        "; also a comment\n"
        "search example.com corp.example\n"
        "options ndots:2 timeout:1\n"
        "nameserver 10.0.0.53\n"
        "  nameserver\t192.0.2.1   # trailing words are ignored\n"
        "nameserver 2001:DB8:0:0::53\n"
        "nameserver fe80::1%eth0\n"
        "nameserver not-an-address\n"
        "nameserver\n"
        "#nameserver 10.9.9.9\n"
        "nameserverx 10.8.8.8\n"
        "nameserver 10.0.0.53\n")
    assert read_resolv_conf(str(path)) == [("10.0.0.53", 53), ("192.0.2.1", 53), ("2001:db8::53", 53),
                                           ("fe80::1%eth0", 53)]


def test_resolv_conf_defaults(tmp_path):
    assert read_resolv_conf(str(tmp_path / "missing")) == [("127.0.0.1", 53)]
    empty = tmp_path / "empty"
    empty.write_text("search example\noptions edns0\n")
    assert read_resolv_conf(str(empty)) == [("127.0.0.1", 53)]
    # the default is a fresh list each time
    got = read_resolv_conf(str(empty))
    got.append(("x", 1))
    assert read_resolv_conf(str(empty)) == [("127.0.0.1", 53)]


def test_resolv_conf_system_file_parses():
    servers = read_resolv_conf()
    assert servers and all(port == 53 for _, port in servers)


def test_hosts(tmp_path):
    path = tmp_path / "hosts"
    path.write_text(
        "# static table\n"
        "127.0.0.1\tlocalhost Localhost.Localdomain\n"
        "::1 localhost ip6-localhost # loopback\n"
        "\n"
        "10.0.0.5 Web.Example.COM web   # the web box\n"
        "10.0.0.6 web.example.com.\n"
        "0:0:0:0:0:ffff:a00:7 mapped.example\n"
        "bogus-address skipped.example\n"
        "10.0.0.9\n"
        "# 10.0.0.10 commented.example\n"
        "10.0.0.5 web\n")
    assert read_hosts(str(path)) == {
        "localhost": ["127.0.0.1", "::1"],
        "localhost.localdomain": ["127.0.0.1"],
        "ip6-localhost": ["::1"],
        "web.example.com": ["10.0.0.5", "10.0.0.6"],
        "web": ["10.0.0.5"],
        "mapped.example": [str(ipaddress.IPv6Address("::ffff:10.0.0.7"))],
    }


def test_hosts_missing_file(tmp_path):
    assert read_hosts(str(tmp_path / "missing")) == {}


def test_hosts_system_file_parses():
    table = read_hosts()
    assert all(name == name.lower() and addrs for name, addrs in table.items())
