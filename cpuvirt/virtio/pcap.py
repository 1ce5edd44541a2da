"""A classic pcap file (the libpcap format: tcpdump, Wireshark and tshark read it).

Two little-endian structures (pcap-savefile(5)): the global header (magic 0xA1B2C3D4, version 2.4,
thiszone 0, sigfigs 0, snaplen, link type 1 = Ethernet), then per frame a record header
(seconds, microseconds, captured length, original length) and the bytes. Timestamps are the
virtual clock, so a capture is byte-identical from run to run.
"""

from __future__ import annotations

import struct

PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 65535


class PcapWriter:
    def __init__(self, path: str, now_ns):
        self.f = open(path, "wb")
        self.now_ns = now_ns
        self.frames = 0
        self.f.write(struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))

    def record(self, direction: str, frame: bytes) -> None:
        ns = self.now_ns()
        data = frame[:SNAPLEN]
        self.f.write(struct.pack("<IIII", ns // 1_000_000_000, ns // 1000 % 1_000_000, len(data), len(frame)))
        self.f.write(data)
        self.frames += 1

    def close(self) -> None:
        self.f.close()
