"""relay/mmsg.pack_messages' whole-run layouts (a run of equal sizes, GSO off) against the
datagram-by-datagram layout they stand in for: every size sequence over an alphabet that meets
each edge (0 bytes, a shorter last one, sizes of which 1, 2 or 3 fit a GSO send, the segment cap),
every start, GSO on, off and limited: the same messages, header for header. Sans-IO: ctypes arrays
only, no syscall."""

from __future__ import annotations

import ctypes
import itertools

import pytest

from portunus.relay import mmsg

ALPHABET = (0, 10, 64, 21000, 30000, 40000)  # 65000 // size: -, 6500, 1015, 3, 2, 1
GSO_MAXES = (mmsg.GSO_OFF, 63, 64, 30000, mmsg.GSO_ANY)


def headers(sizes):
    slots = mmsg.Slots(len(sizes), 16)  # the addresses only matter as numbers here
    tx = mmsg.Headers(len(sizes), slots.addrs, 0, cmsg=True)
    for i, n in enumerate(sizes):
        tx.iov[2 * i], tx.iov[2 * i + 1] = slots.addrs[i], n
    return tx


def described(tx, firsts, counts):
    out = []
    for m, (x, c) in enumerate(zip(firsts, counts)):
        h = tx.arr[m].msg_hdr
        gso = ctypes.c_uint16.from_address(h.msg_control + mmsg.CMSG_HDR).value if h.msg_controllen else None
        out.append((x, c, (h.msg_iov - tx.iov_addr) // mmsg.IOV_SIZE, h.msg_iovlen, h.msg_controllen, gso))
    return out


def both(sizes, start, gso_max):
    fast_tx, slow_tx = headers(sizes), headers(sizes)
    fast = mmsg.pack_messages(fast_tx, start, len(sizes), gso_max)
    slow = mmsg._pack_general(slow_tx, start, len(sizes), gso_max, None)
    return described(fast_tx, *fast), described(slow_tx, *slow)


def test_every_short_sequence_lays_out_as_datagram_by_datagram():
    checked = 0
    for n in range(1, 5):
        for sizes in itertools.product(ALPHABET, repeat=n):
            for gso_max in GSO_MAXES:
                for start in range(n):
                    fast, slow = both(list(sizes), start, gso_max)
                    assert fast == slow, (sizes, start, gso_max)
                    checked += 1
    assert checked > 10_000


@pytest.mark.parametrize("n", [2, 3, 63, 64, 65, 66, 127, 128, 129])
@pytest.mark.parametrize("tail", [None, 64, 10, 0])
@pytest.mark.parametrize("size", [64, 1000, 1016])  # 1016: 63 fit GSO_MAX_BYTES (below the 64-segment cap)
def test_long_runs_split_at_the_segment_and_byte_caps_as_datagram_by_datagram(n, tail, size):
    sizes = [size] * n + ([] if tail is None else [tail])
    for gso_max in (mmsg.GSO_OFF, mmsg.GSO_ANY):
        for start in (0, 1):
            fast, slow = both(sizes, start, gso_max)
            assert fast == slow, (n, tail, size, gso_max, start)


def test_a_whole_run_of_64_equal_datagrams_is_one_gso_message():
    tx = headers([64] * 32)
    firsts, counts = mmsg.pack_messages(tx, 0, 32, mmsg.GSO_ANY)
    assert (firsts, counts) == ([0], [32])
    assert described(tx, firsts, counts) == [(0, 32, 0, 32, mmsg.CMSG_SPACE_U16, 64)]


def test_gso_off_gives_each_datagram_its_own_plain_message_from_header_0():
    tx = headers([64, 10, 64, 64])
    firsts, counts = mmsg.pack_messages(tx, 1, 4, mmsg.GSO_OFF)
    assert (firsts, counts) == ([1, 2, 3], [1, 1, 1])
    assert described(tx, firsts, counts) == [(1, 1, 1, 1, 0, None), (2, 1, 2, 1, 0, None), (3, 1, 3, 1, 0, None)]


def test_words_lays_ints_out_as_pointer_sized_words_for_strided_writes():
    tx = headers([0] * 4)
    tx.iov[1:8:2] = mmsg.words([5, 6, 7, 8])
    assert [tx.iovs[i].iov_len for i in range(4)] == [5, 6, 7, 8]
