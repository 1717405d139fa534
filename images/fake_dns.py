#!/usr/bin/env python3
"""A tiny authoritative DNS answerer over UDP for verify-image.sh: `dns-only.test` A 127.0.0.1,
no AAAA (NOERROR, empty), every other name NXDOMAIN. Logs each question to LOG.

usage: fake_dns.py ADDRESS PORT LOG
"""
import socket, sys

addr, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, port))
with open(log, "a", buffering=1) as out:
    out.write("ready\n")
    while True:
        data, peer = s.recvfrom(4096)
        if len(data) < 12:
            continue
        i, labels = 12, []
        while i < len(data) and data[i] != 0:
            n = data[i]
            labels.append(data[i + 1:i + 1 + n].decode("ascii", "replace"))
            i += n + 1
        qname = ".".join(labels).lower()
        qtype = int.from_bytes(data[i + 1:i + 3], "big")
        question = data[12:i + 5]
        out.write(f"query {qname} type {qtype}\n")
        answer = b""
        if qname == "dns-only.test":
            rcode = 0
            if qtype == 1:
                answer = (b"\xc0\x0c" + (1).to_bytes(2, "big") + (1).to_bytes(2, "big")
                          + (60).to_bytes(4, "big") + (4).to_bytes(2, "big") + bytes([127, 0, 0, 1]))
        else:
            rcode = 3
        flags = bytes([0x80 | 0x04 | (data[2] & 0x01), 0x80 | rcode])
        header = data[:2] + flags + (1).to_bytes(2, "big") + (1 if answer else 0).to_bytes(2, "big") + b"\0\0\0\0"
        s.sendto(header + question + answer, peer)
