"""DNS wire format: the hand parser for the common query and the record packers.

The common query (header, one question, at most an OPT record) is parsed here by hand:
it is what every resolver and stub sends, and dnslib costs tens of microseconds a packet.
Anything else that is still a plausible query, and small (dnslib_may_read), goes to
dnslib (see responder.py).
"""

from __future__ import annotations

import socket
import struct

# Types and classes we answer or recognise.
A, NS, SOA, PTR, TXT, AAAA, SRV, OPT, AXFR, IXFR, ANY = 1, 2, 6, 12, 16, 28, 33, 41, 252, 251, 255
CLASS_IN = 1
CLASS_ANY = 255  # QCLASS * (RFC 1035 3.2.5): answered as IN, as Knot and BIND do

# Response codes (BADVERS is extended: its high bits travel in the OPT record).
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, BADVERS = 0, 1, 2, 3, 4, 5, 16

FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_CD = 0x0010
OPCODE_MASK = 0x7800
ECHOED_FLAGS = FLAG_RD | FLAG_CD  # copied from the query into the answer
EDNS_DO = 0x8000

MAX_NAME = 255
MAX_LABEL = 63
UDP_PLAIN_LIMIT = 512
UDP_MAX_PAYLOAD = 65507  # 65535 less the IPv4 and UDP headers: no datagram carries more
TCP_LIMIT = 65535

HEADER_TAIL = struct.Struct(">HHHHH")  # flags, qd, an, ns, ar (the 10 bytes after the ID)
RR_FIXED = struct.Struct(">HHIH")  # type, class, ttl, rdlength
SECTION_COUNTS = struct.Struct(">HHHH")  # qd, an, ns, ar
TYPE_CLASS = struct.Struct(">HH")
SRV_FIXED = struct.Struct(">HHH")
OPT_FIXED = struct.Struct(">HHBBHH")  # type, payload, ext-rcode, version, flags, rdlength

# Outcomes of parse_query that are not a Query.
DROP = -1  # not worth an answer (too short to hold an ID, or a response sent to us)
UNUSUAL = -2  # maybe valid but not the common shape: let dnslib look at it

# dnslib decodes every name of a message and follows each compression pointer anew, at
# ~80 us for a name of 127 labels: one 64 KiB datagram of 4,000 records whose owners point
# at such a name held the event loop (DNS and the proxy) 0.56 s. A query is its question,
# an OPT and perhaps a TSIG or an answer record; anything bigger is not worth reading.
DNSLIB_MAX_RECORDS = 4  # all four sections together
DNSLIB_MAX_BYTES = 1232


class NameError_(ValueError):
    """A name that cannot be written in wire format (label > 63, name > 255, empty label)."""


def encode_labels(name: str) -> bytes:
    """'a.b' → b'\\x01a\\x01b' (no root byte), lowercased; NameError_ when not encodable."""
    out = bytearray()
    for label in name.strip(".").split("."):
        try:
            raw = label.lower().encode("ascii")
        except UnicodeEncodeError:
            raise NameError_(f"non-ASCII label in {name!r}") from None
        if not 0 < len(raw) <= MAX_LABEL:
            raise NameError_(f"bad label length in {name!r}")
        out.append(len(raw))
        out += raw
    return bytes(out)


def encode_name(name: str) -> bytes:
    """A complete wire name with its root byte; '' or '.' is the root."""
    wire = encode_labels(name) + b"\x00" if name.strip(".") else b"\x00"
    if len(wire) > MAX_NAME:
        raise NameError_(f"name longer than {MAX_NAME} bytes: {name!r}")
    return wire


def label_offsets(wire: bytes) -> list[int]:
    """Start offsets of the labels of a well-formed, uncompressed wire name."""
    offsets = []
    pos = 0
    while wire[pos]:
        offsets.append(pos)
        pos += wire[pos] + 1
    return offsets


def pointer(offset: int) -> bytes:
    return struct.pack(">H", 0xC000 | offset)


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + RR_FIXED.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata


def whole_records(packed: bytes, room: int) -> tuple[int, int]:
    """(how many, how many bytes) of the leading records of `packed` that fit in `room`.

    Owner names are pointers or labels ending in one (as this package packs them)."""
    pos = count = 0
    size = len(packed)
    while pos < size:
        end = pos
        while packed[end] and packed[end] < 0xC0:
            end += packed[end] + 1
        end += 2 if packed[end] else 1
        end += RR_FIXED.size + ((packed[end + 8] << 8) | packed[end + 9])
        if end > room:
            break
        pos = end
        count += 1
    return count, pos


def address_rdata(address: str) -> tuple[int, bytes]:
    """(A or AAAA, packed address) for an IP literal."""
    if ":" in address:
        return AAAA, socket.inet_pton(socket.AF_INET6, address)
    return A, socket.inet_pton(socket.AF_INET, address)


def srv_rdata(priority: int, weight: int, port: int, target: bytes) -> bytes:
    return SRV_FIXED.pack(priority, weight, port) + target


def txt_rdata(text: str) -> bytes:
    raw = text.encode()
    return bytes([len(raw)]) + raw


class Query:
    """One parsed query: what an answer needs from it, and nothing else."""

    __slots__ = ("edns", "flags", "id", "qclass", "qname", "qtype", "question")

    def __init__(
        self,
        id_: bytes,
        flags: int,
        question: bytes,
        qname: bytes,
        qtype: int,
        qclass: int,
        edns: tuple[int, int, int] | None,
    ) -> None:
        self.id = id_
        self.flags = flags
        self.question = question  # the question as asked: name in its case, type, class
        self.qname = qname  # the name in wire format, lowercased (the lookup key)
        self.qtype = qtype
        self.qclass = qclass
        self.edns = edns  # (payload size, DO flag, version) when the query had an OPT


def parse_query(data: bytes) -> Query | int:
    """Parse the common query shape by hand.

    Returns a Query, or DROP, UNUSUAL, FORMERR or NOTIMP. Names may not be compressed in
    the question (a pointer there can only point back into the header), labels are at
    most 63 bytes, names at most 255, and nothing may follow the last record.
    """
    size = len(data)
    if size < 12:
        return DROP
    flags = (data[2] << 8) | data[3]
    if flags & FLAG_QR:
        return DROP  # a response: answering it would let two servers ping-pong forever
    if flags & OPCODE_MASK:
        return NOTIMP
    if data[4] or data[5] != 1:
        return FORMERR
    if data[6] or data[7] or data[8] or data[9] or data[10] or data[11] > 1:
        return UNUSUAL
    pos = 12
    while True:
        if pos >= size:
            return FORMERR
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length > MAX_LABEL:
            return FORMERR  # a compression pointer or a reserved label type
        pos += length + 1
    if pos - 12 > MAX_NAME or pos + 4 > size:
        return FORMERR
    qname = data[12:pos].lower()
    qtype = (data[pos] << 8) | data[pos + 1]
    qclass = (data[pos + 2] << 8) | data[pos + 3]
    pos += 4
    question = data[12:pos]
    edns = None
    if data[11]:
        if pos + 11 > size or data[pos] != 0:
            return UNUSUAL if pos + 11 <= size else FORMERR
        rtype, payload, _ext, version, eflags, rdlength = OPT_FIXED.unpack_from(data, pos + 1)
        if rtype != OPT:
            return UNUSUAL  # e.g. TSIG: dnslib can read it, we ignore it
        pos += 11 + rdlength
        edns = (payload, eflags & EDNS_DO, version)
    if pos != size:
        return FORMERR
    return Query(data[:2], flags, question, qname, qtype, qclass, edns)


def dnslib_may_read(data: bytes) -> bool:
    """Whether a message of at least a header is small enough to hand to dnslib: it is
    then read in about a millisecond at worst (FORMERR for the rest, unread)."""
    counts = sum(SECTION_COUNTS.unpack_from(data, 4))
    return len(data) <= DNSLIB_MAX_BYTES and counts <= DNSLIB_MAX_RECORDS


def error_response(data: bytes, rcode: int) -> bytes:
    """A header-only answer (FORMERR, NOTIMP) to a query whose question we do not trust."""
    flags = (data[2] << 8) | data[3]
    flags = FLAG_QR | (flags & (OPCODE_MASK | ECHOED_FLAGS)) | rcode
    return data[:2] + HEADER_TAIL.pack(flags, 0, 0, 0, 0)
