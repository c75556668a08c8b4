"""Capture files in, IP packets out: pcap and pcapng reading, link layers stripped.

`read_capture(file)` yields a `Frame` per captured packet, with its original
length (dpkt's own readers drop it, and a capture cut by its snap length is
what a queue's copy_range cut looks like to the packet view). The file and
block headers are decoded with dpkt's classes (`dpkt.pcap.FileHdr`,
`PktHdr`, `dpkt.pcapng.*Block`); the record loop is here so it can keep the
original length, every interface's link type (pcapng), and stop with a
`CaptureError` instead of a traceback on a damaged file.

`ip_payload(frame)` strips the link layer by hand with the numbers from
dpkt's tables: a link header is a fixed offset and a type field, and dpkt's
link decoders (`dpkt.ethernet.Ethernet`) would also decode the IP packet
eagerly, which is the packet view's job.
"""
from __future__ import annotations

import struct
from typing import BinaryIO, Iterator, List, NamedTuple, Optional

import dpkt
from dpkt import pcap as _pcap
from dpkt import pcapng as _pcapng

from ipqd.errors import CaptureError, NotIP

LINKTYPE_NULL = _pcap.DLT_NULL              # 0: BSD loopback, host-order AF
LINKTYPE_ETHERNET = _pcap.DLT_EN10MB        # 1
LINKTYPE_RAW = 101                          # LINKTYPE_RAW in files
DLT_RAW_VARIANTS = (12, 14)                 # DLT_RAW as some platforms number it
LINKTYPE_LOOP = 108                         # OpenBSD loopback, network-order AF
LINKTYPE_LINUX_SLL = _pcap.DLT_LINUX_SLL    # 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = _pcap.DLT_LINUX_SLL2  # 276
# The upper bits of a pcap link type field say whether frames carry an FCS.
LINKTYPE_MASK = 0x0FFFFFFF

ETH_P_IP = dpkt.ethernet.ETH_TYPE_IP        # 0x0800
ETH_P_IPV6 = dpkt.ethernet.ETH_TYPE_IP6     # 0x86DD
ETH_P_ARP = dpkt.ethernet.ETH_TYPE_ARP      # 0x0806
VLAN_TYPES = (dpkt.ethernet.ETH_TYPE_8021Q, 0x88A8, 0x9100)
BSD_AF_INET = 2
BSD_AF_INET6 = (10, 24, 28, 30)             # Linux, NetBSD/OpenBSD, FreeBSD, Darwin

PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
MAX_RECORD = 256 * 1024 * 1024              # a bigger record is a damaged file

_H = struct.Struct("!H")


class Frame(NamedTuple):
    number: int                 # 1-based, in file order
    timestamp: float
    linktype: int               # already masked with LINKTYPE_MASK
    data: bytes
    wire_len: int               # the frame's length on the wire


class IPPacket(NamedTuple):
    payload: bytes              # from the IP header on
    family: Optional[int]       # what the link layer said (None: raw IP)
    wire_len: Optional[int]     # the IP packet's real length when the capture cut it


def read_capture(fileobj: BinaryIO) -> Iterator[Frame]:
    """Every frame of a pcap or pcapng file. Raises CaptureError when damaged."""
    magic = fileobj.read(4)
    fileobj.seek(-len(magic), 1)
    if magic == PCAPNG_MAGIC:
        return _read_pcapng(fileobj)
    return _read_pcap(fileobj)


def _read_pcap(f: BinaryIO) -> Iterator[Frame]:
    head = f.read(_pcap.FileHdr.__hdr_len__)
    if len(head) < _pcap.FileHdr.__hdr_len__:
        raise CaptureError("not a pcap or pcapng file (too short)")
    header = _pcap.FileHdr(head)
    magic = header.magic           # read big-endian: the swapped magics mean little-endian
    if magic not in _pcap.MAGIC_TO_PKT_HDR:
        raise CaptureError("not a pcap or pcapng file (unknown magic)")
    if magic in (_pcap.PMUDPCT_MAGIC, _pcap.PMUDPCT_MAGIC_NANO, _pcap.PACPDOM_MAGIC):
        header = _pcap.LEFileHdr(head)
    record = _pcap.MAGIC_TO_PKT_HDR[magic]
    nano = magic in (_pcap.TCPDUMP_MAGIC_NANO, _pcap.PMUDPCT_MAGIC_NANO)
    divisor = 1e9 if nano else 1e6
    linktype = header.linktype & LINKTYPE_MASK
    number = 0
    while True:
        raw = f.read(record.__hdr_len__)
        if not raw:
            return
        number += 1
        if len(raw) < record.__hdr_len__:
            raise CaptureError(f"record {number}: header cut short")
        rec = record(raw)
        if rec.caplen > MAX_RECORD:
            raise CaptureError(f"record {number}: length {rec.caplen} is not believable")
        data = f.read(rec.caplen)
        if len(data) < rec.caplen:
            raise CaptureError(f"record {number}: {len(data)} of {rec.caplen} bytes")
        yield Frame(number, rec.tv_sec + rec.tv_usec / divisor, linktype, data,
                    max(rec.len, rec.caplen))


def _read_pcapng(f: BinaryIO) -> Iterator[Frame]:
    little = True
    interfaces: List[tuple] = []               # (linktype, divisor, offset) per IDB
    number = 0
    while True:
        head = f.read(8)
        if not head:
            return
        if len(head) < 8:
            raise CaptureError("block header cut short")
        kind, length = struct.unpack("<II" if little else ">II", head)
        if kind == _pcapng.PCAPNG_BT_SHB:
            bom = f.read(4)
            little = bom == struct.pack("<I", _pcapng.BYTE_ORDER_MAGIC)
            kind, length = struct.unpack("<II" if little else ">II", head)
            body = bom + f.read(max(0, length - 12))
            interfaces = []
        else:
            body = f.read(max(0, length - 8))
        if length < 12 or length > MAX_RECORD or len(head) + len(body) < length:
            raise CaptureError(f"block of type {kind:#x}: bad length {length}")
        block = head + body
        if kind == _pcapng.PCAPNG_BT_IDB:
            interfaces.append(_interface(block, little))
        elif kind in (_pcapng.PCAPNG_BT_EPB, _pcapng.PCAPNG_BT_PB):
            number += 1
            cls = {(_pcapng.PCAPNG_BT_EPB, True): _pcapng.EnhancedPacketBlockLE,
                   (_pcapng.PCAPNG_BT_EPB, False): _pcapng.EnhancedPacketBlock,
                   (_pcapng.PCAPNG_BT_PB, True): _pcapng.PacketBlockLE,
                   (_pcapng.PCAPNG_BT_PB, False): _pcapng.PacketBlock}[kind, little]
            try:
                packet = cls(block)
            except (dpkt.UnpackError, struct.error) as e:
                raise CaptureError(f"packet {number}: {e}") from None
            if packet.iface_id >= len(interfaces):
                raise CaptureError(f"packet {number}: no interface {packet.iface_id}")
            linktype, divisor, offset = interfaces[packet.iface_id]
            stamp = offset + ((packet.ts_high << 32) | packet.ts_low) / divisor
            yield Frame(number, stamp, linktype, bytes(packet.pkt_data),
                        max(packet.pkt_len, len(packet.pkt_data)))
        elif kind == _pcapng.PCAPNG_BT_SPB:
            number += 1
            if not interfaces:
                raise CaptureError(f"packet {number}: no interface")
            wire = struct.unpack_from("<I" if little else ">I", block, 8)[0]
            data = block[12:12 + min(wire, length - 16)]
            yield Frame(number, 0.0, interfaces[0][0], data, max(wire, len(data)))


def _interface(block: bytes, little: bool) -> tuple:
    cls = _pcapng.InterfaceDescriptionBlockLE if little else _pcapng.InterfaceDescriptionBlock
    try:
        idb = cls(block)
    except (dpkt.UnpackError, struct.error) as e:
        raise CaptureError(f"interface description: {e}") from None
    divisor, offset = 1e6, 0
    for opt in idb.opts:
        if opt.code == _pcapng.PCAPNG_OPT_IF_TSRESOL and opt.data:
            value = opt.data[0]
            divisor = float((2 if value & 0x80 else 10) ** (value & 0x7F))
        elif opt.code == _pcapng.PCAPNG_OPT_IF_TSOFFSET and len(opt.data) == 8:
            offset = struct.unpack("<q" if little else ">q", opt.data)[0]
    return idb.linktype & LINKTYPE_MASK, divisor, offset


def ip_payload(frame: Frame) -> IPPacket:
    """The IP packet inside a frame. Raises NotIP for ARP, other link types, etc."""
    linktype, data = frame.linktype, frame.data
    if linktype == LINKTYPE_ETHERNET:
        offset, family = _ethernet(data)
    elif linktype in (LINKTYPE_RAW,) + DLT_RAW_VARIANTS:
        offset, family = 0, None
    elif linktype == LINKTYPE_IPV4:
        offset, family = 0, 4
    elif linktype == LINKTYPE_IPV6:
        offset, family = 0, 6
    elif linktype == LINKTYPE_LINUX_SLL:
        offset, family = 16, _ethertype_family(_field(data, 14))
    elif linktype == LINKTYPE_LINUX_SLL2:
        offset, family = 20, _ethertype_family(_field(data, 0))
    elif linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        offset, family = 4, _bsd_family(data, linktype)
    else:
        raise NotIP(f"link type {linktype} not supported")
    if len(data) < offset:
        raise NotIP("link header cut short")
    cut = frame.wire_len > len(data)
    return IPPacket(data[offset:], family, frame.wire_len - offset if cut else None)


def _field(data: bytes, offset: int) -> int:
    if len(data) < offset + 2:
        raise NotIP("link header cut short")
    return _H.unpack_from(data, offset)[0]


def _ethertype_family(ethertype: int) -> int:
    if ethertype == ETH_P_IP:
        return 4
    if ethertype == ETH_P_IPV6:
        return 6
    name = " ARP" if ethertype == ETH_P_ARP else ""
    raise NotIP(f"ethertype {ethertype:#06x}{name}")


def _ethernet(data: bytes) -> tuple:
    offset = 12
    ethertype = _field(data, offset)
    while ethertype in VLAN_TYPES:         # 802.1Q / QinQ tags: 4 bytes each
        offset += 4
        ethertype = _field(data, offset)
    return offset + 2, _ethertype_family(ethertype)


def _bsd_family(data: bytes, linktype: int) -> int:
    if len(data) < 4:
        raise NotIP("link header cut short")
    if linktype == LINKTYPE_LOOP:
        af = struct.unpack_from(">I", data)[0]
    else:  # host order of the capturing machine: whichever reading is small
        af = min(struct.unpack_from("<I", data)[0], struct.unpack_from(">I", data)[0])
    if af == BSD_AF_INET:
        return 4
    if af in BSD_AF_INET6:
        return 6
    raise NotIP(f"address family {af}")
