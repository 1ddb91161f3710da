"""Small pieces the IPC source modules share: a wake-up pipe, option types, counting helpers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Annotated

from pydantic import BeforeValidator

from logferry.collectors.framing import LineFramer, OctetFramer
from logferry.collectors.sources.base import Source


def _octal(value: object) -> int:
    """File modes are written the way chmod takes them: "0660", "660" or the TOML integer 0o660."""
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ValueError(f'not an octal file mode: {value!r} (write it like "0660")') from None
    if not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise ValueError(f'not a file mode: {value!r} (write it like "0660")')
    return value


FileMode = Annotated[int, BeforeValidator(_octal)]


class Waker:
    """A self-pipe: `wake()` makes a poll() that includes `fd` return, so a blocked reader sees `stopping`."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        if self._w < 0:
            return
        # Pipe full means already woken; either way the reader will notice.
        with contextlib.suppress(OSError):
            os.write(self._w, b"x")

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        # Forget the numbers first: a late wake() must not write into a reused descriptor.
        fds, self.fd, self._w = (self.fd, self._w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


def one_message(data: bytes) -> bytes:
    """A datagram or queue message is one entry; senders often end it with a newline we do not keep."""
    if data.endswith(b"\n"):
        data = data[:-1]
        if data.endswith(b"\r"):
            data = data[:-1]
    return data


def message_frames(messages: Sequence[bytes]) -> tuple[list[bytes], int]:
    """`one_message` over a batch in one comprehension (no call per message): (non-empty frames, empties)."""
    stripped = [(m[:-2] if m.endswith(b"\r\n") else m[:-1]) if m.endswith(b"\n") else m for m in messages]
    frames = list(filter(None, stripped))
    return frames, len(stripped) - len(frames)


class TruncationCounter:
    """Turns a framer's running `truncated` total into `frame_truncated` source errors, once each."""

    def __init__(self, source: Source, framer: LineFramer | OctetFramer) -> None:
        self._source = source
        self._framer = framer
        self._seen = 0

    def check(self) -> None:
        total = self._framer.truncated
        while self._seen < total:
            self._seen += 1
            self._source.error("frame_truncated")
