"""Load generator for the compose stack: JSON log lines into a unix stream socket, steady with bursts.

    python loadgen.py --socket /run/logferry/app.sock --rate 200 --burst-rate 2000 --burst-every 60

Standard library only, so it runs in the logferry image (or anywhere with Python 3.11).
Lines are newline-delimited JSON with `service` (the agent's ordering key), `level`,
`message` and `seq` (per-service sequence number, so a processor can check key order).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime

LEVELS = ("info",) * 16 + ("debug",) * 2 + ("warning", "error")


def lines(services: int, start: int = 0) -> Iterator[bytes]:
    seq = [0] * services
    n = start
    while True:
        svc = n % services
        seq[svc] += 1
        entry = {
            "timestamp": datetime.now(UTC).isoformat(),
            "service": f"svc-{svc:03d}",
            "level": LEVELS[n % len(LEVELS)],
            "message": f"request {n} handled",
            "seq": seq[svc],
        }
        n += 1
        yield json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def rate_at(elapsed: float, args: argparse.Namespace) -> float:
    """Entries/s at `elapsed` seconds: the base rate, or the burst rate during each burst window."""
    if args.burst_every > 0 and elapsed % args.burst_every >= args.burst_every - args.burst_seconds:
        return args.burst_rate
    return args.rate


def connect(path: str, timeout: float) -> socket.socket:
    """The agent may start after us: retry until the socket accepts or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError as e:
            sock.close()
            if time.monotonic() > deadline:
                raise SystemExit(f"loadgen: cannot connect to {path}: {e.strerror}") from None
            time.sleep(0.2)


def run(args: argparse.Namespace) -> int:
    sock = connect(args.socket, args.connect_timeout)
    sent, t0 = 0, time.monotonic()
    budget = 0.0  # entries we may send now: a token bucket refilled at the current rate
    last = t0
    gen = lines(args.services)
    while args.count == 0 or sent < args.count:
        now = time.monotonic()
        budget = min(budget + (now - last) * rate_at(now - t0, args), max(args.burst_rate, args.rate))
        last = now
        batch = int(budget) if args.count == 0 else min(int(budget), args.count - sent)
        if batch == 0:
            time.sleep(0.005)
            continue
        try:
            sock.sendall(b"".join(next(gen) for _ in range(batch)))
        except OSError:  # the agent restarted: reconnect and go on
            sock.close()
            sock = connect(args.socket, args.connect_timeout)
            continue
        sent += batch
        budget -= batch
    sock.close()
    print(f"loadgen: sent {sent} entries in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True, help="Unix stream socket of the agent's `unix` source.")
    p.add_argument("--rate", type=float, default=200.0, help="Entries/s outside bursts.")
    p.add_argument("--burst-rate", type=float, default=2000.0, help="Entries/s during a burst.")
    p.add_argument("--burst-every", type=float, default=60.0, help="Seconds from one burst to the next (0: none).")
    p.add_argument("--burst-seconds", type=float, default=10.0, help="Length of a burst.")
    p.add_argument("--services", type=int, default=20, help="Distinct `service` values (Kafka keys).")
    p.add_argument("--count", type=int, default=0, help="Stop after this many entries (0: run forever).")
    p.add_argument("--connect-timeout", type=float, default=60.0, help="Seconds to wait for the socket.")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.burst_rate <= 0 or args.services < 1:
        p.error("--rate, --burst-rate and --services must be positive")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
