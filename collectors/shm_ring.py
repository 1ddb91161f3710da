"""A shared-memory ring of log entries: the `shm` source reads it, applications write with ShmWriter.

    from logferry.collectors.shm_ring import ShmWriter
    with ShmWriter("app-logs", on_full="overwrite") as w:   # the agent runs source shm:app-logs
        w.write(b'{"level": "info", "message": "hello"}')

Layout (POSIX shared memory `/NAME`, native little-endian u64 words):

    header, 256 bytes   magic, version, slots, slot_size, flags,
                        head (byte 64: entries published, written by writers),
                        tail (byte 128: entries consumed, written by the reader),
                        overwrites, timeouts, truncated (byte 192: writer-side counters)
    slots x slot_size   stamp u64 | length u32 | flags u32 | payload (slot_size - 16 bytes)

Entry number n lives in slot n % slots. A writer marks the slot busy (stamp = 2^64-1),
writes it, stamps it with n, then publishes head = n + 1. The reader copies a slot and
accepts it only if the stamp equals n before and after the copy (a seqlock), so an entry
overwritten while being read is never delivered half-old, half-new; it is counted as lost.
Lost entries are counted exactly from the entry numbers.

When the ring is full a writer either waits for the reader up to `timeout` and then
drops the entry (returns False, counted in `timeouts`), or overwrites the oldest unread
entry (counted in `overwrites`). It never blocks longer than `timeout`.

Writers: one writer process needs no lock. Several writer processes (or threads) are
supported when the ring is created with `multi_writer=True`: writers then serialise on a
POSIX semaphore `/logferry-shm-NAME.lock`, held for one slot copy only. A writer killed
while holding it blocks the others (each then times out and counts a drop); recover by
removing the ring (`ShmRing.unlink`) and restarting the agent and the writers. The reader never takes the lock.

Memory ordering: the lock-free protocol relies on x86-64 (TSO) store and load ordering
with aligned 8-byte accesses (memoryview cast to "Q"). On weakly ordered CPUs (ARM)
create the ring with `multi_writer=True`, whose semaphore also acts as a barrier
for writers (the reader's stamp check still assumes ordered loads).

The ring outlives the agent (it is never unlinked automatically), so writers keep
writing across agent restarts and the reader resumes at its stored tail.
"""

from __future__ import annotations

import contextlib
import re
import struct
import sys
import time
from multiprocessing import resource_tracker, shared_memory
from typing import Literal

import posix_ipc

from logferry.errors import LogferryError

MAGIC = int.from_bytes(b"LFRING\x00\x01", "little")
VERSION = 1
HEADER_BYTES = 256
SLOT_HEADER = 16
BUSY = (1 << 64) - 1
FLAG_MULTI_WRITER = 1
# u64 word indexes into the header
_MAGIC, _VERSION, _SLOTS, _SLOT_SIZE, _FLAGS = 0, 1, 2, 3, 4
_HEAD, _TAIL = 8, 16  # separate cache lines: writer and reader never share one
_OVERWRITES, _TIMEOUTS, _TRUNCATED = 24, 25, 26
_LENGTH = struct.Struct("=II")  # length, flags (bit 0: payload was truncated)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")


class RingError(LogferryError):
    """The ring does not exist, is not a logferry ring, or its geometry differs from the config."""


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise RingError(f"shm ring name {name!r}: use letters, digits, '_', '.', '-' (no slash), e.g. shm:app-logs")
    return name


def lock_name(name: str) -> str:
    return f"/logferry-shm-{name}.lock"


def _open_segment(name: str, create: bool, size: int = 0) -> shared_memory.SharedMemory:
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name, create=create, size=size, track=False)
    shm = shared_memory.SharedMemory(name, create=create, size=size)
    # Python < 3.13 registers every segment with the resource tracker, which unlinks it when
    # *this* process exits: a writer exiting would delete the agent's ring. We manage its life.
    resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm


class ShmRing:
    """One mapping of a ring; the geometry and the shared counters."""

    def __init__(self, shm: shared_memory.SharedMemory) -> None:
        self.shm = shm
        self.name = shm.name.lstrip("/")
        self.buf = shm.buf
        if len(self.buf) < HEADER_BYTES:
            self.close()
            raise RingError(f"shared memory {self.name!r} is too small to be a logferry ring")
        self.words = self.buf.cast("Q")
        q = self.words
        if q[_MAGIC] != MAGIC or q[_VERSION] != VERSION:
            self.close()
            raise RingError(f"shared memory {self.name!r} is not a logferry ring (version {VERSION}) or not ready")
        self.slots = q[_SLOTS]
        self.slot_size = q[_SLOT_SIZE]
        self.multi_writer = bool(q[_FLAGS] & FLAG_MULTI_WRITER)
        self.payload_max = self.slot_size - SLOT_HEADER

    @staticmethod
    def size_for(slots: int, slot_size: int) -> int:
        return HEADER_BYTES + slots * slot_size

    @classmethod
    def create_or_attach(cls, name: str, slots: int, slot_size: int, multi_writer: bool = False) -> ShmRing:
        """The reader's open: attach to an existing ring with this geometry, or create it."""
        check_name(name)
        if slots < 2 or slot_size < 32 or slot_size % 8:
            raise RingError(f"shm ring {name!r}: slots >= 2 and slot_size >= 32, a multiple of 8")
        try:
            ring = cls(_open_segment(name, create=False))
        except FileNotFoundError:
            ring = cls._create(name, slots, slot_size, multi_writer)
        if (ring.slots, ring.slot_size, ring.multi_writer) != (slots, slot_size, multi_writer):
            have = f"slots={ring.slots} slot_size={ring.slot_size} multi_writer={ring.multi_writer}"
            ring.close()
            raise RingError(
                f"shm ring {name!r} exists with {have}; the config asks for slots={slots} slot_size={slot_size} "
                f"multi_writer={multi_writer} (match it, or remove /dev/shm/{name} when no writer uses it)"
            )
        if multi_writer:  # the lock exists before any writer needs it
            posix_ipc.Semaphore(lock_name(name), posix_ipc.O_CREAT, mode=0o660, initial_value=1).close()
        return ring

    @classmethod
    def _create(cls, name: str, slots: int, slot_size: int, multi_writer: bool) -> ShmRing:
        shm = _open_segment(name, create=True, size=cls.size_for(slots, slot_size))
        q = shm.buf.cast("Q")
        q[_SLOTS], q[_SLOT_SIZE], q[_FLAGS] = slots, slot_size, FLAG_MULTI_WRITER if multi_writer else 0
        per_slot = slot_size // 8
        for i in range(slots):
            q[(HEADER_BYTES // 8) + i * per_slot] = BUSY  # no slot looks like entry 0 before it is written
        q[_VERSION] = VERSION
        q[_MAGIC] = MAGIC  # last: a writer attaching now sees a complete header or none
        q.release()
        return cls(shm)

    @classmethod
    def attach(cls, name: str) -> ShmRing:
        check_name(name)
        try:
            return cls(_open_segment(name, create=False))
        except FileNotFoundError:
            raise RingError(f"shm ring {name!r} does not exist: start the agent with source shm:{name} first") from None

    @staticmethod
    def unlink(name: str) -> None:
        """Remove the ring (and its writer lock). Mappings that exist stay valid until closed."""
        for unlink, target in (
            (posix_ipc.unlink_shared_memory, f"/{name}"),
            (posix_ipc.unlink_semaphore, lock_name(name)),
        ):
            with contextlib.suppress(posix_ipc.ExistentialError):
                unlink(target)

    @property
    def counters(self) -> dict[str, int]:
        q = self.words
        return {
            "head": q[_HEAD],
            "tail": q[_TAIL],
            "overwrites": q[_OVERWRITES],
            "timeouts": q[_TIMEOUTS],
            "truncated": q[_TRUNCATED],
        }

    def read(self, limit: int) -> tuple[list[bytes], int, int]:
        """Up to `limit` unread entries, oldest first; also how many were lost and how many truncated.

        Only one reader may call this (the `shm` source)."""
        q, buf, slots, slot_size, payload_max = self.words, self.buf, self.slots, self.slot_size, self.payload_max
        unpack = _LENGTH.unpack_from
        out: list[bytes] = []
        lost = truncated = 0
        t = q[_TAIL]
        head = q[_HEAD]
        if head - t > slots:  # lapped while we were away: those entries are gone
            lost += head - slots - t
            t = head - slots
        end = min(head, t + limit)
        while t < end:  # the hot loop: locals only
            off = HEADER_BYTES + (t % slots) * slot_size
            stamp = off >> 3
            if q[stamp] == t:
                length, flags = unpack(buf, off + 8)
                start = off + SLOT_HEADER
                data = buf[start : start + (length if length <= payload_max else payload_max)].tobytes()
                if q[stamp] == t:  # not overwritten while we copied
                    out.append(data)
                    truncated += flags & 1
                    t += 1
                    continue
            # A writer overwrote entry t (or is doing so): skip to the oldest entry still intact.
            head = q[_HEAD]
            skip_to = max(t + 1, head + 1 - slots)
            lost += skip_to - t
            t = skip_to
            end = min(head, t + limit - len(out))
        q[_TAIL] = t
        return out, lost, truncated

    def close(self) -> None:
        if getattr(self, "words", None) is not None:
            self.words.release()
            self.words = None  # type: ignore[assignment]
        self.buf = None  # type: ignore[assignment]
        self.shm.close()


class ShmWriter:
    """Writes entries into the ring of a running `shm` source; never blocks longer than `timeout`.

    on_full="wait": wait up to `timeout` seconds for the reader, then drop the entry
    (write returns False; counted in the ring's `timeouts`). on_full="overwrite": replace
    the oldest unread entry at once (counted in `overwrites`). Entries longer than the
    slot payload are cut and flagged (counted in `truncated`). Not thread-safe unless the
    ring is multi_writer.
    """

    def __init__(self, name: str, on_full: Literal["wait", "overwrite"] = "wait", timeout: float = 0.1) -> None:
        if on_full not in ("wait", "overwrite"):
            raise ValueError(f"on_full must be 'wait' or 'overwrite', not {on_full!r}")
        if timeout < 0:
            raise ValueError("timeout must be >= 0 seconds")
        self.ring = ShmRing.attach(name)
        self.overwrite = on_full == "overwrite"
        self.timeout = timeout
        self._lock: posix_ipc.Semaphore | None = None
        if self.ring.multi_writer:
            try:
                self._lock = posix_ipc.Semaphore(lock_name(name))
            except posix_ipc.ExistentialError:
                self.ring.close()
                raise RingError(f"shm ring {name!r} is multi_writer but its lock {lock_name(name)} is gone") from None
        self.dropped = 0  # entries this writer dropped after waiting `timeout`

    def write(self, entry: bytes | str) -> bool:
        """Append one entry; False if the ring stayed full for `timeout` (the entry is dropped, counted)."""
        data = entry.encode() if isinstance(entry, str) else entry
        ring = self.ring
        if self._lock is None:  # fast path: one writer and room in the ring
            head = ring.words[_HEAD]
            if head - ring.words[_TAIL] < ring.slots:
                self._put(head, data)
                return True
        return self._write_slow(data)

    def _write_slow(self, data: bytes) -> bool:
        """The ring is full, or writers share the lock: wait, overwrite or drop as configured."""
        ring = self.ring
        q = ring.words
        deadline = 0.0
        pause = 50e-6
        while True:
            if self._lock is not None and not self._acquire(deadline):
                return self._dropped()
            try:
                head = q[_HEAD]
                if head - q[_TAIL] < ring.slots or self.overwrite:
                    if head - q[_TAIL] >= ring.slots:
                        q[_OVERWRITES] += 1
                    self._put(head, data)
                    return True
                now = time.monotonic()
                deadline = deadline or now + self.timeout
                if now >= deadline:
                    return self._dropped()
            finally:
                if self._lock is not None:
                    self._lock.release()
            time.sleep(min(pause, max(deadline - now, 0)))
            pause = min(pause * 2, 1e-3)

    def _put(self, n: int, data: bytes) -> None:
        ring, q = self.ring, self.ring.words
        flags = 0
        if len(data) > ring.payload_max:
            data = data[: ring.payload_max]
            flags = 1
            q[_TRUNCATED] += 1
        off = HEADER_BYTES + (n % ring.slots) * ring.slot_size
        stamp = off >> 3
        q[stamp] = BUSY  # readers now reject this slot until the new stamp
        _LENGTH.pack_into(ring.buf, off + 8, len(data), flags)
        start = off + SLOT_HEADER
        ring.buf[start : start + len(data)] = data
        q[stamp] = n
        q[_HEAD] = n + 1

    def _acquire(self, deadline: float) -> bool:
        assert self._lock is not None
        left = self.timeout if not deadline else max(deadline - time.monotonic(), 0)
        try:
            self._lock.acquire(left)
        except posix_ipc.BusyError:
            return False
        return True

    def _dropped(self) -> bool:
        # Called without the lock only when another writer held it past our timeout: then the
        # shared counter update can race with another writer's; this writer's `dropped` stays exact.
        self.ring.words[_TIMEOUTS] += 1
        self.dropped += 1
        return False

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        self.ring.close()

    def __enter__(self) -> ShmWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
