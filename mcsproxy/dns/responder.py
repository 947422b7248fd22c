"""Query bytes in, answer bytes out: the DNS logic, free of sockets.

Two levels of precomputation keep the hot path short:
- the zone index holds every record set packed, with names as pointers into the question;
- `memo` maps the exact bytes of a UDP query after its ID (flags, question in the case it
  was asked, OPT) to the bytes of the answer after its ID, so a repeated question costs a
  dict lookup and a concatenation. It is cleared whenever a snapshot is applied, filled
  only with answers that do not depend on anything but the snapshot, and bounded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from typing import Final

import dnslib

from mcsproxy.config import DnsConfig
from mcsproxy.dns.wire import (
    ANY,
    AXFR,
    BADVERS,
    CLASS_ANY,
    CLASS_IN,
    DROP,
    ECHOED_FLAGS,
    EDNS_DO,
    FLAG_AA,
    FLAG_QR,
    FLAG_RA,
    FLAG_TC,
    FORMERR,
    HEADER_TAIL,
    IXFR,
    MAX_LABEL,
    MAX_NAME,
    NOERROR,
    NOTIMP,
    NXDOMAIN,
    OPCODE_MASK,
    OPT,
    OPT_FIXED,
    REFUSED,
    SERVFAIL,
    SOA,
    TCP_LIMIT,
    TYPE_CLASS,
    UDP_MAX_PAYLOAD,
    UDP_PLAIN_LIMIT,
    UNUSUAL,
    Query,
    dnslib_may_read,
    error_response,
    parse_query,
    pointer,
    rr,
    whole_records,
)
from mcsproxy.dns.zone import NS_LABELS, Additional, Node, ZoneIndex
from mcsproxy.model import Snapshot

log = logging.getLogger("mcsproxy.dns")

MEMO_MAX_ENTRIES: Final = 32768
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 86400
SOA_TIMERS: Final = struct.Struct(">IIIII")  # serial, refresh, retry, expire, minimum
SERIAL_BITS: Final = 32
SERIAL_MASK: Final = (1 << SERIAL_BITS) - 1
SERIAL_HALF: Final = 1 << (SERIAL_BITS - 1)


def serial_after(a: int, b: int) -> bool:
    """Whether serial a is greater than serial b in RFC 1982 serial number arithmetic."""
    return a != b and ((a - b) & SERIAL_MASK) < SERIAL_HALF


def next_serial(previous: int | None, clock_s: int) -> int:
    """The SOA serial for a new zone: the clock in seconds, or previous + 1 when the clock
    has not moved past it (two snapshots in one second). A cache or secondary that
    compares serials (RFC 1982) sees every change; starting from the clock, a restart
    does not go back unless the last run got more changes ahead of the clock than the
    restart took seconds."""
    clock_s &= SERIAL_MASK
    if previous is None or serial_after(clock_s, previous):
        return clock_s
    return (previous + 1) & SERIAL_MASK


class Forward:
    """The answer is the upstream's: the caller forwards the query as it came."""

    __slots__ = ("opt", "question")

    def __init__(self, question: bytes, opt: bytes = b"") -> None:
        self.question = question  # what the upstream's answer must echo
        # Our OPT record for an answer the forwarder makes itself (SERVFAIL when the
        # upstream is silent or the pending table full); empty when the query had none.
        self.opt = opt


def parse_unusual(data: bytes) -> Query | int:
    """dnslib's reading of a query that is not the common shape (extra sections, TSIG…)."""
    if not dnslib_may_read(data):
        return FORMERR
    try:
        record = dnslib.DNSRecord.parse(data)
    except Exception:  # untrusted bytes; dnslib raises several unrelated types
        return FORMERR
    if len(record.questions) != 1:
        return FORMERR
    opts = [a for a in record.ar if a.rtype == OPT]
    if len(opts) > 1:
        return FORMERR
    question = record.questions[0]
    labels = question.qname.label
    if any(not 0 < len(label) <= MAX_LABEL for label in labels):
        return FORMERR
    wire = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    if len(wire) > MAX_NAME:
        return FORMERR
    edns = None
    if opts:
        ttl = opts[0].ttl
        edns = (opts[0].rclass, ttl & 0x8000, (ttl >> 16) & 0xFF)
    flags = (data[2] << 8) | data[3]
    return Query(
        data[:2],
        flags,
        wire + TYPE_CLASS.pack(question.qtype, question.qclass),
        wire.lower(),
        question.qtype,
        question.qclass,
        edns,
    )


def own_addresses(host: str) -> tuple[str, ...]:
    """The addresses ns.dns.<zone> answers with: the one DNS listens on. None (an empty
    tuple) for a wildcard (which of the host's addresses a client reaches it on is not
    ours to know) or a host name (resolving it here would block, and it may name several)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return ()
    return () if ip.is_unspecified else (str(ip),)


class Responder:
    def __init__(self, config: DnsConfig, loaded: asyncio.Event, eager: bool = False) -> None:
        self.zone = ZoneIndex(
            config.domain, config.ttl_s, eager=eager, ns_addresses=own_addresses(config.listen[0])
        )
        self.loaded = loaded
        self.forwarding = config.upstream is not None
        # --dns-edns-max may say 65535, but a larger datagram cannot be sent at all: the
        # client would wait for its timeout instead of retrying over TCP.
        self.edns_max = min(config.edns_max_payload, UDP_MAX_PAYLOAD)
        self.ttl = config.ttl_s
        self.memo: dict[bytes, bytes] = {}
        self.serial: int | None = None  # none until the first snapshot
        self._soa: dict[int, bytes] = {}

    def apply(self, snapshot: Snapshot) -> int:
        try:
            return self._update_zone(snapshot)
        finally:
            # Whatever the zone holds now, it is not what the memo and the serial were
            # made from: keeping them would answer from the old snapshot indefinitely.
            self.serial = next_serial(self.serial, int(snapshot.built_at) or snapshot.version)
            self._soa.clear()
            self.memo.clear()  # the same dict object: the UDP fast path holds its .get

    def _update_zone(self, snapshot: Snapshot) -> int:
        try:
            return self.zone.apply(snapshot)
        except Exception:  # a bug of ours; the index is half-updated, so start it over
            log.exception(
                "dns zone update to snapshot version=%d failed; rebuilding the "
                "zone from the whole snapshot",
                snapshot.version,
            )
            return self.zone.rebuild(snapshot)

    # -- entry point -------------------------------------------------------------------
    def respond(self, data: bytes, tcp: bool) -> bytes | Forward | None:
        """The answer to one message; None to drop it; a Forward to ask the upstream."""
        query = parse_query(data)
        common = True
        if type(query) is int and query == UNUSUAL:
            query = parse_unusual(data)
            common = False
        if type(query) is int:
            if query == NOTIMP and data[2] & (OPCODE_MASK >> 8):
                return self.not_implemented(data, tcp)
            if query == FORMERR:
                return self.header_error(data, FORMERR)
            return None if query == DROP else error_response(data, query)
        assert isinstance(query, Query)
        answer, cacheable = self.answer(query, tcp)
        if cacheable and common and not tcp and isinstance(answer, bytes):
            memo = self.memo
            if len(memo) >= MEMO_MAX_ENTRIES:
                memo.clear()  # bounded: random names cannot grow it without limit
            memo[data[2:]] = answer[2:]
        return answer

    def header_error(self, data: bytes, rcode: int) -> bytes:
        """An error (FORMERR, NOTIMP, SERVFAIL) with the header alone, and our OPT record
        when the query carries exactly one (RFC 6891 7), e.g. a query with no question or
        two: their count is wrong, the OPT record may still be fine."""
        answer = error_response(data, rcode)
        if not (data[10] or data[11]) or not dnslib_may_read(data):
            return answer
        try:
            record = dnslib.DNSRecord.parse(data)
        except Exception:  # untrusted bytes; dnslib raises several unrelated types
            return answer
        opts = [a for a in record.ar if a.rtype == OPT]
        if len(opts) != 1:
            return answer  # RFC 6891 6.1.1: two OPTs are the error itself
        opt = b"\x00" + OPT_FIXED.pack(OPT, self.edns_max, 0, 0, opts[0].ttl & EDNS_DO, 0)
        return answer[:10] + b"\x00\x01" + opt

    def not_implemented(self, data: bytes, tcp: bool) -> bytes:
        """NOTIMP for an opcode other than QUERY, its opcode echoed; with the question and,
        for a query with an OPT record, ours (RFC 6891 7: a responder MUST include one),
        when the rest of the message reads as a query; else the header alone."""
        flags = (data[2] << 8) | data[3]
        as_query = data[:2] + (flags & ~OPCODE_MASK).to_bytes(2, "big") + data[4:]
        q = parse_query(as_query)
        if type(q) is int and q == UNUSUAL:
            q = parse_unusual(as_query)
        if type(q) is int:
            return self.header_error(data, NOTIMP)
        assert isinstance(q, Query)
        q.flags = flags
        return self.message(q, NOTIMP, tcp, aa=False)

    def refused(self, data: bytes, tcp: bool) -> bytes | None:
        """REFUSED to a query whose name would be forwarded, but not for this client
        (--dns-allow-from), with its question and OPT as every other answer of ours: Go's
        stub resolver ignores an answer without its question over UDP and waits out its
        timeout (5 s a try) instead of failing at once. Only queries respond() turned into
        a Forward come here, so they parse."""
        q = parse_query(data)
        if type(q) is int and q == UNUSUAL:
            q = parse_unusual(data)
        if type(q) is int:
            return error_response(data, REFUSED) if len(data) >= 12 else None
        assert isinstance(q, Query)
        return self.message(q, REFUSED, tcp, aa=False)

    def truncated(self, data: bytes) -> bytes | None:
        """A UDP client's question with TC set and no records: "ask again over TCP".

        Response rate limiting sends it instead of the answer (guard.ResponseRateLimit).
        It echoes the question and, for an EDNS query, an OPT record, and it carries AA
        for names in the zone (RA for names we forward): glibc's stub resolver ignores an
        answer whose question does not match its own, and takes an empty NOERROR answer
        with neither AA, RA nor any additional record for a referral and gives up on the
        server, instead of retrying over TCP. None for anything but a plain query
        (responses above all: they are never answered)."""
        q = parse_query(data)
        if type(q) is int:
            return None
        assert isinstance(q, Query)
        if self.zone.lookup(q.qname) is not ZoneIndex.OUT_OF_ZONE:
            answer = bytearray(self.message(q, NOERROR, False))
        elif self.forwarding:
            answer = bytearray(self.message(q, NOERROR, False, aa=False))
            answer[3] |= FLAG_RA
        else:
            return self.message(q, REFUSED, False, aa=False)  # no bigger than the query
        answer[2] |= FLAG_TC >> 8
        return bytes(answer)

    def answer(self, q: Query, tcp: bool) -> tuple[bytes | Forward, bool]:
        """(answer, whether it may be memoised)."""
        if q.edns is not None and q.edns[2] != 0:
            return self.message(q, BADVERS, tcp, aa=False), False
        # Errors are not memoised: only answers real clients repeat earn a memo slot.
        # QCLASS ANY asks for every class, and the zone holds IN alone: its IN records
        # are the whole answer (Knot and BIND answer so; NOTIMP made a client that asks
        # with class * fail on a name that exists).
        if (q.qclass != CLASS_IN and q.qclass != CLASS_ANY) or q.qtype in (AXFR, IXFR):
            return self.message(q, NOTIMP, tcp, aa=False), False
        if q.qtype == OPT:
            return self.message(q, FORMERR, tcp, aa=False), False
        found = self.zone.lookup(q.qname)
        if found is ZoneIndex.OUT_OF_ZONE:
            if self.forwarding:
                return Forward(q.question, self.opt_record(q, NOERROR)), False
            return self.message(q, REFUSED, tcp, aa=False), True
        if not self.loaded.is_set():
            return self.message(q, SERVFAIL, tcp, aa=False), False
        if found is None:
            return self.message(q, NXDOMAIN, tcp, authority=self.soa(len(q.qname))), True
        assert isinstance(found, Node)
        rrset = found.rrsets().get(q.qtype)
        if rrset is not None:
            return self.message(q, NOERROR, tcp, rrset[0], rrset[1], additional=rrset[2]), True
        if q.qname == self.zone.apex and q.qtype in (SOA, ANY):
            # The SOA follows the serial, so it is packed here rather than in the zone.
            count, packed = 1, self.soa(len(q.qname))
            if q.qtype == ANY:
                for n, records, _ in found.rrsets().values():
                    count += n
                    packed += records
            return self.message(q, NOERROR, tcp, count, packed), True
        return self.message(q, NOERROR, tcp, authority=self.soa(len(q.qname))), True

    # -- packing -----------------------------------------------------------------------
    def opt_record(self, q: Query, rcode: int) -> bytes:
        """Our OPT record for an answer to q: RFC 6891 6.1.1 wants one in every answer to
        a query that had one (the DO bit echoed, the rcode's high bits), and none else."""
        if q.edns is None:
            return b""
        return b"\x00" + OPT_FIXED.pack(OPT, self.edns_max, rcode >> 4, 0, q.edns[1], 0)

    def server_failure(self, data: bytes, tcp: bool) -> bytes | None:
        """SERVFAIL for a query whose answer failed (a bug of ours): with its question and
        OPT as every other answer when it parses, else the header alone."""
        try:
            q = parse_query(data)
            if type(q) is int and q == UNUSUAL:
                q = parse_unusual(data)
            if isinstance(q, Query):
                return self.message(q, SERVFAIL, tcp, aa=False)
        except Exception:  # the same bug may lie in the parser: the header is still ours
            log.debug("dns: cannot read back a query that failed", exc_info=True)
        return self.header_error(data, SERVFAIL) if len(data) >= 12 else None

    def soa(self, qname_len: int) -> bytes:
        """The zone's SOA record, its names pointing at the zone's suffix of the question."""
        packed = self._soa.get(qname_len)
        if packed is None:
            apex = pointer(12 + qname_len - len(self.zone.apex))
            rdata = (
                NS_LABELS
                + apex
                + b"\x0ahostmaster"
                + apex
                + SOA_TIMERS.pack(self.serial or 0, SOA_REFRESH, SOA_RETRY, SOA_EXPIRE, self.ttl)
            )
            packed = self._soa[qname_len] = rr(apex, SOA, self.ttl, rdata)
        return packed

    def message(
        self,
        q: Query,
        rcode: int,
        tcp: bool,
        an_count: int = 0,
        answers: bytes = b"",
        authority: bytes = b"",
        aa: bool = True,
        additional: Additional | None = None,
    ) -> bytes:
        # The opcode is QUERY's 0 in every answer but not_implemented's.
        flags = (
            FLAG_QR
            | (FLAG_AA if aa else 0)
            | (q.flags & (ECHOED_FLAGS | OPCODE_MASK))
            | (rcode & 0xF)
        )
        edns = q.edns
        opt = self.opt_record(q, rcode)
        if edns is None:
            limit = UDP_PLAIN_LIMIT
        else:
            limit = max(UDP_PLAIN_LIMIT, min(edns[0], self.edns_max))
        if tcp:
            limit = TCP_LIMIT
        ar = 1 if opt else 0
        ns_count = 1 if authority else 0
        extra = b""
        if additional is not None:
            # Whole record sets of the additional section while they fit; the rest is
            # left out without TC (RFC 2181 9): it only saves the client a query.
            room = limit - 12 - len(q.question) - len(answers) - len(authority) - len(opt)
            packed, ends = additional
            for count, end in ends:
                if end > room:
                    break
                ar = count + (1 if opt else 0)
                extra = packed[:end]
        msg = b"".join(
            (
                q.id,
                HEADER_TAIL.pack(flags, 1, an_count, ns_count, ar),
                q.question,
                answers,
                authority,
                extra,
                opt,
            )
        )
        if len(msg) > limit:
            # Too big for this transport. Over UDP the question alone with TC set: the
            # client retries over TCP and gets it all. Over TCP there is nothing to retry
            # with: as many whole records as fit in a message, TC set.
            count, cut = (
                whole_records(answers, limit - 12 - len(q.question) - len(opt)) if tcp else (0, 0)
            )
            msg = b"".join(
                (
                    q.id,
                    HEADER_TAIL.pack(flags | FLAG_TC, 1, count, 0, 1 if opt else 0),
                    q.question,
                    answers[:cut],
                    opt,
                )
            )
        return msg
