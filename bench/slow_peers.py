#!/usr/bin/env python3
"""bench/slow_peers.py - how responsive mx-pod's SMTP stays while slow and silent peers are held.

    slow_peers.py SMTP_PORT ADMIN_PORT SLOW ADMIN_HALF_OPEN SAMPLES

Measures SAMPLES ordinary SMTP transactions (connect, EHLO, MAIL, RCPT, DATA of 1 KiB, QUIT)
one after the other on 127.0.0.1, first with nothing else going on, then while SLOW SMTP clients
trickle a command line (one byte every 2 s) and ADMIN_HALF_OPEN connections to the admin port
send nothing. Prints one line: `baseline_ms_median baseline_ms_max loaded_ms_median
loaded_ms_max ok_loaded held_slow held_admin`. Bounded: every connection it opens is closed at
the end, the whole run stops after 120 s.
"""
import asyncio
import statistics
import sys
import time

HOST = "127.0.0.1"


async def reply(reader):
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return line


async def transaction(port, n):
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        await reply(reader)
        for cmd in [b"EHLO bench.test", b"MAIL FROM:<b@sender.test>", b"RCPT TO:<user@example.test>", b"DATA"]:
            writer.write(cmd + b"\r\n")
            await writer.drain()
            r = await reply(reader)
            if not r[:1] in (b"2", b"3"):
                return None
        body = b"Subject: latency %d\r\n\r\n" % n + b"x" * 1024 + b"\r\n.\r\n"
        writer.write(body)
        await writer.drain()
        r = await reply(reader)
        writer.write(b"QUIT\r\n")
        await writer.drain()
        if not r.startswith(b"250"):
            return None
        return (time.monotonic() - t0) * 1000
    finally:
        writer.close()


async def samples(port, count):
    out = []
    for i in range(count):
        ms = await asyncio.wait_for(transaction(port, i), 30)
        if ms is not None:
            out.append(ms)
    return out


async def slow_client(port, stop):
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
        await reply(reader)
        line = b"EHLO a-slow-client.example.test\r\n"
        i = 0
        while not stop.is_set() and i < len(line) - 2:  # never completes the line
            writer.write(line[i:i + 1])
            await writer.drain()
            i += 1
            try:
                await asyncio.wait_for(stop.wait(), 2)
            except asyncio.TimeoutError:
                pass
        writer.close()
        return 1
    except (ConnectionError, OSError):
        return 0


async def half_open(port, stop):
    try:
        _, writer = await asyncio.open_connection(HOST, port)
        await stop.wait()
        writer.close()
        return 1
    except (ConnectionError, OSError):
        return 0


async def main():
    smtp, admin, slow, half, count = (int(a) for a in sys.argv[1:6])
    base = await samples(smtp, count)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(slow_client(smtp, stop)) for _ in range(slow)]
    tasks += [asyncio.create_task(half_open(admin, stop)) for _ in range(half)]
    await asyncio.sleep(3)  # let them connect
    loaded = await samples(smtp, count)
    stop.set()
    held = await asyncio.gather(*tasks)
    print(
        "%.1f %.1f %.1f %.1f %d %d %d"
        % (
            statistics.median(base),
            max(base),
            statistics.median(loaded) if loaded else -1,
            max(loaded) if loaded else -1,
            len(loaded),
            sum(held[:slow]),
            sum(held[slow:]),
        )
    )


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(), 120))
