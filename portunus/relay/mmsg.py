"""recvmmsg/sendmmsg through ctypes: many UDP datagrams per syscall, into preallocated buffers.

One ``Batch`` per ``RelayContext`` (``batch_for(ctx)``), made on first use by a UDP rule. It holds
two sets of ``SLOTS`` receive slots of 64 KiB each (inbound: end users -> upstream; replies:
upstream -> end users) in anonymous ``mmap`` memory (a page is resident only once a datagram
touched it: 64-byte datagrams keep ~4 KiB per slot resident), and the ``struct mmsghdr`` /
``struct iovec`` / ``sockaddr`` arrays that point into them, built once. The hot path reads and
writes those arrays through ``memoryview`` casts (``msg_len`` as u32, ``iov_base``/``iov_len``
and ``msg_name`` as pointer-sized words), so a datagram costs a few index operations, never an
allocation or a ctypes struct access.

``batch_for`` returns None (the caller keeps the per-datagram ``recvfrom_into``/``sendto`` path)
where the calls are missing: not Linux, ctypes or libc not loadable, no ``recvmmsg`` symbol,
``PORTUNUS_DISABLE_UDP_BATCH=1``, or a call that failed with ``ENOSYS``/``EPERM`` (a seccomp
sandbox) earlier on the same context (``Batch.disable()``).

UDP GSO (``UDP_SEGMENT``, Linux >= 4.18, probed with getsockopt): ``pack_messages`` turns each run
of equal-sized datagrams to one destination into one message of many iovecs with a
``UDP_SEGMENT`` cmsg, so the kernel walks the IP stack once per run and cuts it back into the
same datagrams (on loopback at the receiving socket, on a NIC by the NIC or by software GSO).
A path that refuses it (EINVAL: a segment above the path MTU; EIO: no checksum offload, IPsec)
turns it off for that flow and the datagrams go one message each. ``PORTUNUS_DISABLE_UDP_GSO=1``
turns it off.
"""

from __future__ import annotations

import ctypes
import errno
from array import array
import mmap
import os
import socket
import sys
import time

SLOTS = 32               # datagrams per recvmmsg/sendmmsg
SLOT_SIZE = 65536        # a whole UDP datagram always fits: never MSG_TRUNC
NAME_STRIDE = 32         # bytes per sockaddr slot (sockaddr_in6 is 28)
_NAME_U32 = NAME_STRIDE // 4
MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
UNSUPPORTED_ERRNOS = (errno.ENOSYS, errno.EPERM)   # the call itself is refused: fall back
ENV_DISABLE = "PORTUNUS_DISABLE_UDP_BATCH"
ENV_DISABLE_GSO = "PORTUNUS_DISABLE_UDP_GSO"
SOL_UDP = 17
UDP_SEGMENT = 103
GSO_MAX_BYTES = 65000    # payload bytes per GSO message (the UDP length field is 16 bits)
GSO_MAX_SEGMENTS = 64    # UDP_MAX_SEGMENTS of the oldest kernels with UDP_SEGMENT (4.18)
GSO_OFF = 0              # a flow's gso_max when GSO is off for it
GSO_ANY = 65507          # a flow's gso_max when any segment size may try GSO
GSO_REFUSED_ERRNOS = (errno.EINVAL, errno.EIO, errno.EMSGSIZE, errno.EOPNOTSUPP, errno.ENOPROTOOPT)


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", msghdr), ("msg_len", ctypes.c_uint)]


class cmsghdr(ctypes.Structure):
    _fields_ = [("cmsg_len", ctypes.c_size_t), ("cmsg_level", ctypes.c_int), ("cmsg_type", ctypes.c_int)]


HDR_SIZE = ctypes.sizeof(mmsghdr)
IOV_SIZE = ctypes.sizeof(iovec)
PTR = ctypes.sizeof(ctypes.c_void_p)
PTR_FMT = {8: "Q", 4: "I"}[PTR]
# word indexes (in units of the cast) of the fields the hot path touches
_LEN_WORD = mmsghdr.msg_len.offset // 4                            # u32 view
_NAME_WORD = msghdr.msg_name.offset // PTR                         # pointer view
_NAMELEN_WORD = msghdr.msg_namelen.offset // 4                     # u32 view
_IOV_WORD = msghdr.msg_iov.offset // PTR                           # pointer view
_IOVLEN_WORD = msghdr.msg_iovlen.offset // PTR                     # size_t = pointer width
_CTRLLEN_WORD = msghdr.msg_controllen.offset // PTR
CMSG_HDR = ctypes.sizeof(cmsghdr)
CMSG_LEN_U16 = CMSG_HDR + 2                                        # CMSG_LEN(sizeof(uint16_t))
CMSG_SPACE_U16 = (CMSG_LEN_U16 + PTR - 1) // PTR * PTR             # CMSG_SPACE(sizeof(uint16_t))
_HW = HDR_SIZE // PTR
_HU = HDR_SIZE // 4
assert HDR_SIZE % PTR == 0 and HDR_SIZE % 4 == 0 and IOV_SIZE == 2 * PTR
_ARRAY_CODE = next(c for c in "QLI" if array(c).itemsize == PTR)   # the array of pointer-sized words
assert memoryview(array(_ARRAY_CODE)).format == PTR_FMT or PTR_FMT == "Q" and _ARRAY_CODE == "L"


def words(values) -> memoryview:
    """``values`` (ints) as pointer-sized words: what a strided slice of ``Headers.iov`` or
    ``Headers.words`` takes in one assignment."""
    return memoryview(array(_ARRAY_CODE, values)).cast("B").cast(PTR_FMT)


def _libc_calls():
    """(recvmmsg, sendmmsg) from libc, or None where they cannot be had.

    Loaded through ``PyDLL`` without ``argtypes``: the calls are non-blocking (MSG_DONTWAIT on
    receive, non-blocking sockets on send), so keeping the GIL costs nothing, and arguments
    arrive as ints and prebuilt ``c_void_p`` (``Headers.at``): about 1 us less per call than
    ``CDLL`` with ``argtypes``. Pointers must be passed as ``c_void_p``, never as ints."""
    if not sys.platform.startswith("linux") or os.environ.get(ENV_DISABLE) == "1":
        return None
    try:
        libc = ctypes.PyDLL(None, use_errno=True)
        recv, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    recv.restype = ctypes.c_int
    send.restype = ctypes.c_int
    return recv, send


def gso_available() -> bool:
    """Whether the kernel takes UDP_SEGMENT (getsockopt answers on kernels that know it)."""
    if os.environ.get(ENV_DISABLE_GSO) == "1":
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.getsockopt(SOL_UDP, UDP_SEGMENT)
        return True
    except OSError:
        return False


class Headers:
    """``count`` mmsghdr, each with one iovec: preallocated, addressed by index. With ``cmsg``,
    each also owns a UDP_SEGMENT control message (sent only where msg_controllen is set)."""

    def __init__(self, count: int, slot_addrs: list[int], slot_size: int, names_addr: int = 0,
                 namelen: int = 0, cmsg: bool = False):
        self.count = count
        self.arr = (mmsghdr * count)()
        self.iovs = (iovec * count)()
        for i in range(count):
            self.iovs[i].iov_base = slot_addrs[i]
            self.iovs[i].iov_len = slot_size
            h = self.arr[i].msg_hdr
            h.msg_iov = ctypes.addressof(self.iovs) + i * IOV_SIZE
            h.msg_iovlen = 1
            if names_addr:
                h.msg_name = names_addr + i * NAME_STRIDE
                h.msg_namelen = namelen
        self.addr = ctypes.addressof(self.arr)
        self.ptrs = [ctypes.c_void_p(self.addr + i * HDR_SIZE) for i in range(count)]
        self.ptr = self.ptrs[0]
        raw = memoryview(self.arr).cast("B")
        self.u32 = raw.cast("I")             # msg_len at i * HDR_SIZE/4 + _LEN_WORD
        self.words = raw.cast(PTR_FMT)       # msg_name at i * HDR_SIZE/PTR + _NAME_WORD
        self.iov = memoryview(self.iovs).cast("B").cast(PTR_FMT)  # base at 2i, len at 2i+1
        self.iov_addr = ctypes.addressof(self.iovs)
        # pack_messages' one-datagram-a-message layout, written with strided slices
        self.iov_ptrs = words([self.iov_addr + i * IOV_SIZE for i in range(count)])
        self.ones = words([1] * count)
        self.zeros = words([0] * count)
        self.namelens: dict[int, memoryview] = {}  # pack_named_singles: msg_namelen x count
        self.cmsgs = None
        if cmsg:
            self.cmsgs = (ctypes.c_char * (count * CMSG_SPACE_U16))()
            base = ctypes.addressof(self.cmsgs)
            for i in range(count):
                c = cmsghdr.from_buffer(self.cmsgs, i * CMSG_SPACE_U16)
                c.cmsg_len, c.cmsg_level, c.cmsg_type = CMSG_LEN_U16, SOL_UDP, UDP_SEGMENT
                self.arr[i].msg_hdr.msg_control = base + i * CMSG_SPACE_U16
            self.cm_u16 = memoryview(self.cmsgs).cast("B").cast("H")  # gso_size of msg i at i*step+off

    def at(self, i: int) -> ctypes.c_void_p:
        """The address of header ``i`` as the calls take it."""
        return self.ptrs[i]

    def lengths(self, n: int) -> list[int]:
        """msg_len of the first ``n`` headers (after a recvmmsg)."""
        u32, step = self.u32, HDR_SIZE // 4
        return [u32[i * step + _LEN_WORD] for i in range(n)]


_CM_STEP = CMSG_SPACE_U16 // 2
_CM_OFF = CMSG_HDR // 2


def pack_messages(tx: Headers, start: int, end: int, gso_max: int, owners=None) -> tuple[list, list]:
    """Lay the datagram iovecs ``start..end-1`` of ``tx`` (iov_base/iov_len written by the
    caller) out as messages from header 0 on: a run of equal sizes (the run's last datagram may
    be shorter) up to ``gso_max`` bytes each and one destination becomes one GSO message; any
    other datagram is a message of its own. ``owners[i]`` (replies: the flow of datagram i,
    with ``name_addr``/``name_len``/``gso_max``) splits runs and names each message.
    Returns (first datagram, datagram count) per message.

    Without owners, the two common shapes are laid out without a Python step per datagram:
    every size equal (the last may be shorter) within ``gso_max`` (one GSO message per
    ``GSO_MAX_SEGMENTS``), and GSO off (a message per datagram, by strided slices)."""
    if owners is None and end > start:
        n = end - start
        if n == 1 or gso_max <= 0:
            return _one_a_message(tx, start, end)
        sizes = tx.iov[2 * start + 1:2 * end:2].tolist()
        size = sizes[0]
        if 0 < size <= gso_max:
            eq = sizes.count(size)
            if eq == n or (eq == n - 1 and 0 < sizes[-1] < size):
                if GSO_MAX_BYTES // size < 2:
                    return _one_a_message(tx, start, end)  # no two of this size fit one GSO send
                return _equal_runs(tx, start, end, size, start + eq)
    return _pack_general(tx, start, end, gso_max, owners)


def _one_a_message(tx: Headers, start: int, end: int) -> tuple[list, list]:
    n = end - start
    words = tx.words
    words[_IOV_WORD:_IOV_WORD + n * _HW:_HW] = tx.iov_ptrs[start:end]
    words[_IOVLEN_WORD:_IOVLEN_WORD + n * _HW:_HW] = tx.ones[:n]
    words[_CTRLLEN_WORD:_CTRLLEN_WORD + n * _HW:_HW] = tx.zeros[:n]
    return list(range(start, end)), [1] * n


def pack_named_singles(tx: Headers, n: int, name_addrs: list, name_len: int) -> tuple[list, list]:
    """Lay datagram iovecs ``0..n-1`` of ``tx`` out as one message each, message i to the
    sockaddr at ``name_addrs[i]`` (all ``name_len`` bytes long: one listen socket, one family):
    the replies of many flows, one each, without a Python step per datagram."""
    firsts, counts = _one_a_message(tx, 0, n)
    tx.words[_NAME_WORD:_NAME_WORD + n * _HW:_HW] = words(name_addrs)
    lens = tx.namelens.get(name_len)
    if lens is None:
        lens = tx.namelens[name_len] = memoryview(array("I", [name_len] * tx.count))
    tx.u32[_NAMELEN_WORD:_NAMELEN_WORD + n * _HU:_HU] = lens[:n]
    return firsts, counts


def _equal_runs(tx: Headers, start: int, end: int, size: int, eq_end: int) -> tuple[list, list]:
    """Datagrams start..eq_end-1 of ``size`` bytes, then (eq_end == end - 1) one shorter: as
    ``_pack_general`` lays them out (the shorter one joins the last message of two or more that
    has room for it, else goes alone)."""
    per = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size)
    words, iov_addr, cm = tx.words, tx.iov_addr, tx.cm_u16
    firsts: list[int] = []
    counts: list[int] = []
    m = 0
    x = start
    while x < end:
        if x < eq_end:
            y = min(x + per, eq_end)
            if y == eq_end < end and y - x > 1 and x + per > eq_end:
                y = end  # the shorter last one joins this message
        else:
            y = end
        base = m * _HW
        words[base + _IOV_WORD] = iov_addr + x * IOV_SIZE
        words[base + _IOVLEN_WORD] = y - x
        if y - x > 1:
            words[base + _CTRLLEN_WORD] = CMSG_SPACE_U16
            cm[m * _CM_STEP + _CM_OFF] = size
        else:
            words[base + _CTRLLEN_WORD] = 0
        firsts.append(x)
        counts.append(y - x)
        m += 1
        x = y
    return firsts, counts


def _pack_general(tx: Headers, start: int, end: int, gso_max: int, owners) -> tuple[list, list]:
    iov, words = tx.iov, tx.words
    firsts: list[int] = []
    counts: list[int] = []
    m = 0
    x = start
    iov_addr = tx.iov_addr
    while x < end:
        size = iov[2 * x + 1]
        owner = owners[x] if owners is not None else None
        limit = owner.gso_max if owner is not None else gso_max
        y = x + 1
        if 0 < size <= limit and y < end and (owners is None or owners[y] is owner) \
                and 0 < iov[2 * y + 1] <= size:  # a run can start here (lone datagrams skip it)
            cap = min(end, x + min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
            if owner is None:
                while y < cap and iov[2 * y + 1] == size:
                    y += 1
                if y < cap and y > x + 1 and 0 < iov[2 * y + 1] < size:
                    y += 1
            else:
                while y < cap and iov[2 * y + 1] == size and owners[y] is owner:
                    y += 1
                if y < cap and y > x + 1 and 0 < iov[2 * y + 1] < size and owners[y] is owner:
                    y += 1
        base = m * _HW
        words[base + _IOV_WORD] = iov_addr + x * IOV_SIZE
        words[base + _IOVLEN_WORD] = y - x
        if y - x > 1:
            words[base + _CTRLLEN_WORD] = CMSG_SPACE_U16
            tx.cm_u16[m * _CM_STEP + _CM_OFF] = size
        else:
            words[base + _CTRLLEN_WORD] = 0
        if owner is not None:
            words[base + _NAME_WORD] = owner.name_addr
            tx.u32[m * _HU + _NAMELEN_WORD] = owner.name_len
        firsts.append(x)
        counts.append(y - x)
        m += 1
        x = y
    return firsts, counts


class Slots:
    """``count`` receive buffers of ``size`` bytes in one anonymous mapping."""

    def __init__(self, count: int, size: int):
        self.count, self.size = count, size
        self.mem = mmap.mmap(-1, count * size)
        self.view = memoryview(self.mem)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        self.addrs = [base + i * size for i in range(count)]
        self.addr_words = words(self.addrs)  # the same as words, for strided iov_base writes
        self.views = [self.view[i * size:(i + 1) * size] for i in range(count)]  # slot i, whole
        # slot i's first cut_len[i] bytes, kept for the next datagram of that length there (a run
        # of one is written from its slot: sizes repeat, a memoryview slice per datagram does not)
        self.cuts = list(self.views)
        self.cut_len = [-1] * count

    def data(self, i: int, n: int) -> memoryview:
        off = i * self.size
        return self.view[off:off + n]


class Batch:
    """The preallocated arrays and the two calls, shared by every UDP rule on one context."""

    def __init__(self, calls, slots: int = SLOTS, slot_size: int = SLOT_SIZE):
        self.recvmmsg, self.sendmmsg = calls
        self.enabled = True
        self.gso_max = GSO_ANY if calls[0] is not None and gso_available() else GSO_OFF  # new flows
        self.n = slots
        self.inbound = Slots(slots, slot_size)
        self.replies = Slots(slots, slot_size)
        self.names = (ctypes.c_char * (slots * NAME_STRIDE))()
        self.names_view = memoryview(self.names).cast("B")
        self.names_q = self.names_view.cast("Q")   # IPv4 key: family, port, address (8 bytes)
        self.names_u32 = self.names_view.cast("I")  # IPv6 key: the 7 words of a sockaddr_in6
        names = ctypes.addressof(self.names)
        # end users -> us: with source addresses (namelen is rewritten by the kernel, and is
        # constant per family: one array per family keeps it right without a reset per call)
        self.rx4 = Headers(slots, self.inbound.addrs, slot_size, names, 16)
        self.rx6 = Headers(slots, self.inbound.addrs, slot_size, names, 28)
        # us -> upstream (connected: no names); iov_base/iov_len written per datagram
        self.up_tx = Headers(slots, self.inbound.addrs, 0, cmsg=True)
        # upstream -> us (connected: no names)
        self.up_rx = Headers(slots, self.replies.addrs, slot_size)
        # us -> end users: msg_name/msg_namelen point at each flow's own sockaddr
        self.reply_tx = Headers(slots, self.replies.addrs, 0, cmsg=True)
        # the replies queued for one listen socket, flushed after this loop turn's events
        self.q_sock = None
        self.q_flows: list = [None] * slots
        self.q_lens = [0] * slots
        self.q_n = 0
        self.origin = [0] * slots   # up_tx entry -> the inbound slot it carries
        self.rx_cursor = 0          # next free reply slot
        self.reply_views = self.replies.views
        self.q_runs = False         # some flow queued two or more in a row: GSO may apply
        self.flush_scheduled = False
        self.turn_now = 0.0         # the clock when this loop turn's first reply was read
        self.turn = 0               # loop turns that had replies (udp.flush_replies ends one)
        self.now = time.monotonic  # batch_for: the context loop's clock
        # a run of one datagram goes upstream with one write(2) on the flow's connected socket:
        # (fd, buffer) -> bytes sent or OSError, as os.write (a C call, ~0.4 us less than sendmmsg
        # through ctypes, and no header to lay out); an attribute so tests can wrap it
        self.send_one = os.write

    def disable(self) -> None:
        self.enabled = False

    def rx(self, family: int) -> Headers:
        return self.rx6 if family == socket.AF_INET6 else self.rx4

    # ---- sockaddr helpers (per flow, not per datagram) -------------------------------
    def name_key(self, family: int, i: int):
        """The dict key of slot ``i``'s source address: an int (IPv4: family, port, address) or
        (IPv6) the tuple of the 7 native u32 words of its 28-byte sockaddr_in6."""
        if family == socket.AF_INET6:
            off = i * _NAME_U32
            return tuple(self.names_u32[off:off + 7])
        return self.names_q[i * (NAME_STRIDE // 8)]

    def keys(self, family: int, r: int) -> list:
        """``name_key`` of slots ``0..r-1`` (after a recvmmsg that got ``r``), read off the array
        in a few C calls: no Python step per datagram."""
        if family == socket.AF_INET6:
            u, step = self.names_u32, _NAME_U32
            return list(zip(*(u[w:w + r * step:step].tolist() for w in range(7))))
        step = NAME_STRIDE // 8
        return self.names_q[0:r * step:step].tolist()

    def raw_name(self, family: int, i: int) -> bytes:
        off = i * NAME_STRIDE
        return bytes(self.names_view[off:off + (28 if family == socket.AF_INET6 else 16)])


def decode_sockaddr(raw: bytes):
    """A sockaddr_in / sockaddr_in6 as the address tuple ``socket.recvfrom`` returns."""
    fam = int.from_bytes(raw[0:2], sys.byteorder)
    if fam == socket.AF_INET6:
        return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big"),
                int.from_bytes(raw[4:8], "big"), int.from_bytes(raw[24:28], sys.byteorder))
    if fam == socket.AF_INET:
        return (socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big"))
    raise ValueError(f"address family {fam} is neither AF_INET nor AF_INET6")


def key_of_raw(raw: bytes):
    """``Batch.name_key`` of a sockaddr given as bytes (the same key, computed off the arrays)."""
    if len(raw) >= 28 and int.from_bytes(raw[0:2], sys.byteorder) == socket.AF_INET6:
        return tuple(memoryview(bytes(raw[:28])).cast("I"))
    return int.from_bytes(raw[:8], sys.byteorder)


def name_buffer(raw: bytes):
    """A ctypes copy of one flow's sockaddr for its replies' msg_name: (buffer, address, length)."""
    buf = ctypes.create_string_buffer(raw, len(raw))
    return buf, ctypes.addressof(buf), len(raw)


def batch_for(ctx) -> Batch | None:
    """The context's Batch (made on first use), or None: use the per-datagram path."""
    b = ctx.udp_batch
    if b is False:
        calls = _libc_calls()
        b = Batch(calls) if calls is not None else None
        loop = getattr(ctx, "loop", None)
        if b is not None and loop is not None:
            b.now = loop.time  # the context's clock, for flows' last_seen
        ctx.udp_batch = b
    if b is not None and not b.enabled:
        return None
    return b
