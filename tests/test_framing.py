"""Property tests for the stream framers: chunking never changes the frames, bounds always hold."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from logferry.collectors.framing import LineFramer, OctetFramer

# Small alphabets make the interesting bytes (newline, CR, digits, space) common.
line_bytes = st.binary(max_size=40).map(
    lambda b: bytes(c % 8 for c in b).translate(bytes.maketrans(bytes(range(8)), b"ab\r 19\n0"))
)
max_sizes = st.integers(min_value=1, max_value=24)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def run(framer: LineFramer | OctetFramer, chunks: list[bytes]) -> list[bytes]:
    frames: list[bytes] = []
    for chunk in chunks:
        frames += framer.feed(chunk)
    return frames + framer.flush()


def expected_lines(data: bytes, max_bytes: int) -> tuple[list[bytes], int]:
    """The LineFramer contract, written the slow obvious way."""
    frames, truncated = [], 0
    for line in data.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            continue
        if len(line) > max_bytes:
            line, truncated = line[:max_bytes], truncated + 1
        frames.append(line)
    return frames, truncated


@settings(max_examples=400)
@example(data=b"abc\r\n", cuts=[4], max_bytes=3)  # found in review: the '\r' alone used to count as a cut
@example(data=b"abcd\r\n", cuts=[5], max_bytes=3)
@example(data=b"\r\r", cuts=[], max_bytes=1)  # a last line without newline follows the same rule
@given(data=line_bytes, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12), max_bytes=max_sizes)
def test_line_framer_any_chunking_gives_the_frames_of_the_whole_stream(data: bytes, cuts: list[int], max_bytes: int):
    whole = LineFramer(max_bytes)
    pieces = LineFramer(max_bytes)
    want, want_truncated = expected_lines(data, max_bytes)
    assert run(whole, [data]) == want
    assert run(pieces, chunked(data, cuts)) == want
    assert whole.truncated == pieces.truncated == want_truncated
    assert all(0 < len(f) <= max_bytes for f in want)


octet_frames = st.lists(
    st.one_of(
        st.tuples(st.just("octet"), st.binary(min_size=1, max_size=40)),
        st.tuples(st.just("line"), line_bytes.map(lambda b: b.replace(b"\n", b""))),
    ),
    max_size=8,
)


def octet_stream(parts: list[tuple[str, bytes]]) -> bytes:
    out = b""
    for kind, body in parts:
        out += (str(len(body)).encode() + b" " + body) if kind == "octet" else body + b"\n"
    return out


@settings(max_examples=400)
@given(parts=octet_frames, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12), max_bytes=max_sizes)
def test_octet_framer_any_chunking_gives_the_frames_of_the_whole_stream(
    parts: list[tuple[str, bytes]], cuts: list[int], max_bytes: int
):
    data = octet_stream(parts)
    whole = OctetFramer(max_bytes)
    pieces = OctetFramer(max_bytes)
    frames = run(whole, [data])
    assert run(pieces, chunked(data, cuts)) == frames
    assert whole.truncated == pieces.truncated
    assert all(len(f) <= max_bytes for f in frames)


@settings(max_examples=300)
@given(
    bodies=st.lists(st.binary(min_size=1, max_size=60).filter(lambda b: not b.endswith(b"\n")), max_size=6),
    max_bytes=max_sizes,
)
def test_octet_counted_frames_come_back_exactly_cut_at_the_bound_and_counted(bodies: list[bytes], max_bytes: int):
    data = b"".join(str(len(b)).encode() + b" " + b for b in bodies)
    framer = OctetFramer(max_bytes)
    assert run(framer, [data[i : i + 1] for i in range(len(data))]) == [b[:max_bytes] for b in bodies]
    assert framer.truncated == sum(len(b) > max_bytes for b in bodies)


def test_octet_and_line_truncations_add_up():
    framer = OctetFramer(4)
    frames = framer.feed(b"6 abcdef" + b"long line\n" + b"6 ghijkl" + b"another long line\n")
    assert frames == [b"abcd", b"long", b"ghij", b"anot"]
    assert framer.truncated == 4


def test_half_octet_frame_at_end_of_stream_is_reported_not_delivered():
    framer = OctetFramer()
    assert framer.feed(b"5 hello10 half") == [b"hello"]
    assert framer.has_half_frame
    assert framer.flush() == []
