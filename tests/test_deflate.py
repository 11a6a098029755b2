"""permessage-deflate codec (RFC 7692 §7.2): one suite, run on both twins.

Every test takes the ``impl`` fixture, parametrized over the compiled
``wirehub._ext.deflate`` and the readable ``wirehub._pure.deflate`` (the
"ext/ against _pure/" pattern); the cross tests take both.
"""

from __future__ import annotations

import random
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wirehub._ext import deflate as ext_deflate
from wirehub._pure import deflate as pure_deflate

IMPLS = {"ext": ext_deflate, "pure": pure_deflate}
TAIL = b"\x00\x00\xff\xff"
MiB = 1024 * 1024
# Frame-length boundaries (RFC 6455 §5.2: 7-bit, 16-bit, 64-bit lengths).
SIZES = [0, 1, 125, 126, 65535, 65536, MiB]


@pytest.fixture(params=sorted(IMPLS), ids=lambda name: name)
def impl(request):
    return IMPLS[request.param]


@pytest.fixture(params=[(a, b) for a in sorted(IMPLS) for b in sorted(IMPLS)], ids="{0[0]}->{0[1]}".format)
def pair(request):
    """(compressing module, inflating module), every combination."""
    a, b = request.param
    return IMPLS[a], IMPLS[b]


def payload(size: int, seed: int, *, text: bool = True) -> bytes:
    """Deterministic test data: compressible text-like or random bytes."""
    rng = random.Random(seed)
    if not text:
        return rng.randbytes(size)
    words = [b"wirehub", b"channel", b"offset", b"publish", b'{"bid":', b"101.5}", b" ", b"\n"]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    return bytes(out[:size])


def inflate_all(inflater, data: bytes, pieces: int = 1, seed: int = 0) -> bytes:
    """Feed ``data`` as ``pieces`` frames split at random points."""
    rng = random.Random(seed)
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(pieces - 1))
    bounds = [0, *cuts, len(data)]
    out = []
    for i in range(pieces):
        out.append(inflater.feed(data[bounds[i] : bounds[i + 1]], i == pieces - 1))
    return b"".join(out)


# --- round trips ------------------------------------------------------------------


class TestRoundTrip:
    @pytest.mark.parametrize("size", SIZES)
    @pytest.mark.parametrize("text", [True, False], ids=["text", "random"])
    def test_sizes(self, pair, size, text):
        deflate_mod, inflate_mod = pair
        data = payload(size, seed=size, text=text)
        deflater = deflate_mod.Deflater()
        inflater = inflate_mod.Inflater(max_message_bytes=2 * MiB)
        compressed = deflater.compress(data)
        assert not compressed.endswith(TAIL) or size == 0  # §7.2.1 tail removed
        assert inflater.feed(compressed, True) == data
        # The same deflater/inflater pair carries on with context takeover.
        assert inflater.feed(deflater.compress(data), True) == data

    @pytest.mark.parametrize("pieces", [2, 3, 17])
    def test_fragmented_feeding(self, impl, pieces):
        data = payload(200_000, seed=pieces)
        deflater = impl.Deflater()
        inflater = impl.Inflater(max_message_bytes=MiB)
        for message in range(3):
            compressed = deflater.compress(data)
            assert inflate_all(inflater, compressed, pieces, seed=message) == data

    def test_empty_fragments(self, impl):
        data = payload(5000, seed=1)
        compressed = impl.Deflater().compress(data)
        inflater = impl.Inflater(max_message_bytes=MiB)
        out = inflater.feed(b"", False) + inflater.feed(compressed, False) + inflater.feed(b"", True)
        assert out == data

    def test_empty_message(self, impl):
        deflater = impl.Deflater()
        inflater = impl.Inflater(max_message_bytes=10)
        for _ in range(3):
            compressed = deflater.compress(b"")
            assert compressed == b"\x00"  # an empty stored block's header, tail removed
            assert inflater.feed(compressed, True) == b""

    @pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
    def test_bytes_like(self, impl, kind):
        data = payload(3000, seed=2)
        compressed = impl.Deflater().compress(kind(data))
        assert impl.Inflater(max_message_bytes=MiB).feed(kind(compressed), True) == data

    @pytest.mark.parametrize("window_bits", range(8, 16))
    @pytest.mark.parametrize("mem_level", [1, 8, 9])
    def test_window_bits_and_mem_level(self, pair, window_bits, mem_level):
        deflate_mod, inflate_mod = pair
        data = payload(70_000, seed=window_bits)
        deflater = deflate_mod.Deflater(window_bits=window_bits, mem_level=mem_level, level=9)
        inflater = inflate_mod.Inflater(window_bits=window_bits, max_message_bytes=MiB)
        for _ in range(2):
            assert inflater.feed(deflater.compress(data), True) == data

    def test_window_bits_8_runs_as_9(self, impl):
        # zlib cannot compress raw deflate with a 256-byte window.
        assert impl.Deflater(window_bits=8).window_bits == 9
        assert impl.Inflater(window_bits=8, max_message_bytes=1).window_bits == 9
        # A peer that asked zlib for "8" really used 9: still decodable.
        data = payload(10_000, seed=8)
        compressor = zlib.compressobj(9, zlib.DEFLATED, -9)
        compressed = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
        inflater = impl.Inflater(window_bits=8, max_message_bytes=MiB)
        assert inflater.feed(compressed[:-4], True) == data

    @pytest.mark.parametrize("level", [-1, 0, 1, 9])
    def test_levels(self, impl, level):
        data = payload(50_000, seed=level)
        compressed = impl.Deflater(level=level).compress(data)
        if level == 0:
            assert len(compressed) > len(data)  # stored blocks
        else:
            assert len(compressed) < len(data) // 3
        assert impl.Inflater(max_message_bytes=MiB).feed(compressed, True) == data


# --- context takeover (RFC 7692 §7.1.1) -----------------------------------------------


class TestContextTakeover:
    def test_takeover_shrinks_a_repeated_message(self, impl):
        data = payload(4000, seed=3, text=False)  # incompressible on its own
        deflater = impl.Deflater()
        first = deflater.compress(data)
        second = deflater.compress(data)
        assert len(first) > len(data)
        assert len(second) < 100  # one back-reference into the previous message

    def test_no_context_takeover_repeats_the_same_bytes(self, impl):
        data = payload(4000, seed=3, text=False)
        deflater = impl.Deflater(no_context_takeover=True)
        first = deflater.compress(data)
        assert deflater.compress(data) == first
        inflater = impl.Inflater(no_context_takeover=True, max_message_bytes=MiB)
        assert inflater.feed(first, True) == data
        assert inflater.feed(first, True) == data

    def test_inflater_without_takeover_forgets_the_window(self, impl):
        data = payload(4000, seed=3, text=False)
        deflater = impl.Deflater()  # the peer (wrongly) keeps its context
        first, second = deflater.compress(data), deflater.compress(data)
        inflater = impl.Inflater(no_context_takeover=True, max_message_bytes=MiB)
        assert inflater.feed(first, True) == data
        with pytest.raises(impl.InvalidData, match="distance too far back"):
            inflater.feed(second, True)

    def test_inflater_with_takeover_keeps_the_window(self, impl):
        data = payload(4000, seed=3, text=False)
        deflater = impl.Deflater()
        inflater = impl.Inflater(max_message_bytes=MiB)
        for _ in range(5):
            assert inflater.feed(deflater.compress(data), True) == data


# --- limits: max_message_bytes, max_ratio ---------------------------------------------


def zeros_compressed(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = compressor.compress(bytes(size)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4]


class TestLimits:
    def test_bomb_is_stopped_without_allocating_it(self, impl):
        bomb = zeros_compressed(10 * MiB)
        assert len(bomb) < 20_000
        inflater = impl.Inflater(max_message_bytes=MiB)
        tracemalloc.start()
        try:
            with pytest.raises(impl.MessageTooBig, match="max_message_bytes=1048576"):
                inflater.feed(bomb, True)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # PyMem_* (the ext's buffers) and zlib's state are traced; 10 MiB never is.
        assert peak < 3 * MiB, peak

    def test_bomb_split_into_frames(self, impl):
        bomb = zeros_compressed(10 * MiB)
        inflater = impl.Inflater(max_message_bytes=MiB)
        size = 0
        with pytest.raises(impl.MessageTooBig):
            for i in range(0, len(bomb), 100):
                size += len(inflater.feed(bomb[i : i + 100], i + 100 >= len(bomb)))
        assert size <= MiB

    def test_exact_limit(self, impl):
        data = payload(10_000, seed=4)
        compressed = impl.Deflater().compress(data)
        assert impl.Inflater(max_message_bytes=10_000).feed(compressed, True) == data
        with pytest.raises(impl.MessageTooBig):
            impl.Inflater(max_message_bytes=9_999).feed(compressed, True)

    def test_limit_is_per_message(self, impl):
        data = payload(6_000, seed=5)
        deflater = impl.Deflater()
        inflater = impl.Inflater(max_message_bytes=10_000)
        for _ in range(5):  # 30 000 bytes in all, 6 000 per message
            assert inflate_all(inflater, deflater.compress(data), 3) == data

    def test_ratio(self, impl):
        bomb = zeros_compressed(2 * MiB)
        inflater = impl.Inflater(max_message_bytes=64 * MiB, max_ratio=100)
        with pytest.raises(impl.MessageTooBig, match="max_ratio=100"):
            inflater.feed(bomb, True)

    def test_ratio_spares_small_messages(self, impl):
        # 512 KiB of zeros inflates ~1000:1 but stays under the 1 MiB floor.
        small = zeros_compressed(512 * 1024)
        inflater = impl.Inflater(max_message_bytes=64 * MiB, max_ratio=100)
        assert inflater.feed(small, True) == bytes(512 * 1024)
        assert impl.RATIO_FLOOR_BYTES == MiB

    def test_ratio_off_by_default(self, impl):
        bomb = zeros_compressed(2 * MiB)
        assert len(impl.Inflater(max_message_bytes=64 * MiB).feed(bomb, True)) == 2 * MiB

    def test_zero_limit(self, impl):
        inflater = impl.Inflater(max_message_bytes=0)
        assert inflater.feed(impl.Deflater().compress(b""), True) == b""
        with pytest.raises(impl.MessageTooBig):
            inflater.feed(impl.Deflater().compress(b"x"), True)


# --- invalid input ------------------------------------------------------------------------


class TestInvalid:
    @pytest.mark.parametrize(
        "data",
        [b"\xff\xff\xff\xff", b"\x07", b"\x03\x00\x00\x00\xff\xff\xff"],
        ids=["bad-block-type", "reserved-btype", "garbage"],
    )
    def test_corrupt_input(self, impl, data):
        inflater = impl.Inflater(max_message_bytes=MiB)
        with pytest.raises(impl.InvalidData):
            inflater.feed(data, True)
        # The stream is unusable afterwards: the connection must be failed.
        with pytest.raises(impl.InvalidData, match="failed earlier"):
            inflater.feed(impl.Deflater().compress(b"ok"), True)

    def test_too_big_is_final_too(self, impl):
        inflater = impl.Inflater(max_message_bytes=10)
        with pytest.raises(impl.MessageTooBig):
            inflater.feed(impl.Deflater().compress(bytes(100)), True)
        with pytest.raises(impl.InvalidData):
            inflater.feed(impl.Deflater().compress(b"ok"), True)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"window_bits": 7},
            {"window_bits": 16},
            {"level": 10},
            {"level": -2},
            {"mem_level": 0},
            {"mem_level": 10},
        ],
    )
    def test_bad_deflater_options(self, impl, kwargs):
        with pytest.raises(ValueError):
            impl.Deflater(**kwargs)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"window_bits": 7, "max_message_bytes": 1},
            {"window_bits": 16, "max_message_bytes": 1},
            {"max_message_bytes": -1},
            {"max_message_bytes": 1, "max_ratio": -1},
        ],
    )
    def test_bad_inflater_options(self, impl, kwargs):
        with pytest.raises(ValueError):
            impl.Inflater(**kwargs)

    def test_max_message_bytes_is_required(self, impl):
        with pytest.raises(TypeError):
            impl.Inflater()

    def test_options_are_keyword_only(self, impl):
        with pytest.raises(TypeError):
            impl.Deflater(6)

    def test_not_bytes(self, impl):
        with pytest.raises(TypeError):
            impl.Deflater().compress("text")
        with pytest.raises(TypeError):
            impl.Inflater(max_message_bytes=1).feed("text", True)


# --- other endpoints: the stdlib zlib and BFINAL streams --------------------------------


class TestInterop:
    @pytest.mark.parametrize("size", SIZES)
    def test_stdlib_to_impl(self, impl, size):
        data = payload(size, seed=size)
        compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
        inflater = impl.Inflater(max_message_bytes=2 * MiB)
        for _ in range(2):  # context takeover on both sides
            compressed = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
            assert compressed.endswith(TAIL)
            assert inflater.feed(compressed[:-4], True) == data

    @pytest.mark.parametrize("size", SIZES)
    def test_impl_to_stdlib(self, impl, size):
        data = payload(size, seed=size)
        deflater = impl.Deflater()
        decompressor = zlib.decompressobj(-15)
        for _ in range(2):
            assert decompressor.decompress(deflater.compress(data) + TAIL) == data

    def test_same_bytes_as_stdlib(self, impl):
        data = payload(100_000, seed=6)
        compressor = zlib.compressobj(6, zlib.DEFLATED, -15, 8)
        deflater = impl.Deflater()
        if impl.ZLIB_RUNTIME_VERSION != zlib.ZLIB_RUNTIME_VERSION:
            pytest.skip("different zlib builds may emit different (valid) streams")
        for message in (data, b"", data[:10], data):
            expected = compressor.compress(message) + compressor.flush(zlib.Z_SYNC_FLUSH)
            assert deflater.compress(message) == expected[:-4]

    def test_bfinal_block(self, impl):
        # §7.2.3.4: a peer may end a message with a BFINAL block; it then has
        # to start a new stream for the next message.
        inflater = impl.Inflater(max_message_bytes=MiB)
        for i in range(3):
            data = payload(3000, seed=i)
            compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
            finished = compressor.compress(data) + compressor.flush(zlib.Z_FINISH)
            assert inflater.feed(finished, True) == data

    def test_two_streams_in_one_message(self, impl):
        first = zlib.compressobj(6, zlib.DEFLATED, -15)
        second = zlib.compressobj(6, zlib.DEFLATED, -15)
        message = first.compress(b"abc") + first.flush(zlib.Z_FINISH)
        message += second.compress(b"def") + second.flush(zlib.Z_SYNC_FLUSH)
        inflater = impl.Inflater(max_message_bytes=MiB)
        assert inflater.feed(message[:-4], True) == b"abcdef"

    def test_stored_blocks(self, impl):
        compressor = zlib.compressobj(0, zlib.DEFLATED, -15)
        data = payload(200_000, seed=7, text=False)
        compressed = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
        assert inflate_all(impl.Inflater(max_message_bytes=MiB), compressed[:-4], 7) == data


# --- the twins agree: hypothesis --------------------------------------------------------

options = st.fixed_dictionaries(
    {
        "level": st.sampled_from([-1, 0, 1, 6, 9]),
        "mem_level": st.integers(1, 9),
        "window_bits": st.integers(8, 15),
        "no_context_takeover": st.booleans(),
    }
)
messages = st.lists(
    st.one_of(
        st.binary(max_size=3000),
        st.builds(lambda n, b: b * n, st.integers(0, 20_000), st.binary(min_size=1, max_size=8)),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(opts=options, msgs=messages, data=st.data())
def test_twins_agree(opts, msgs, data):
    """Both twins read each other's streams and, on one zlib, write the same bytes."""
    # Level 0 writes stored blocks sized by the output room zlib is given,
    # which differs between the twins (deflateBound vs CPython's growing
    # buffer): valid either way, so only compressed levels must match bytes.
    same_bytes = (
        ext_deflate.ZLIB_RUNTIME_VERSION == pure_deflate.ZLIB_RUNTIME_VERSION and opts["level"] != 0
    )
    deflaters = {name: mod.Deflater(**opts) for name, mod in IMPLS.items()}
    inflaters = {
        (src, dst): IMPLS[dst].Inflater(
            window_bits=opts["window_bits"],
            no_context_takeover=opts["no_context_takeover"],
            max_message_bytes=max(map(len, msgs)),
        )
        for src in IMPLS
        for dst in IMPLS
    }
    for msg in msgs:
        compressed = {name: d.compress(msg) for name, d in deflaters.items()}
        if same_bytes:
            assert compressed["ext"] == compressed["pure"]
        pieces = data.draw(st.integers(1, 5), label="frames")
        for (src, dst), inflater in inflaters.items():
            blob = compressed[src]
            cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), min_size=pieces - 1, max_size=pieces - 1)))
            bounds = [0, *cuts, len(blob)]
            out = b"".join(
                inflater.feed(blob[bounds[i] : bounds[i + 1]], i == pieces - 1) for i in range(pieces)
            )
            assert out == msg, (src, dst)


def _outcome(inflater, frames):
    """Inflate frames; return the output or the error class name where it failed."""
    out = []
    try:
        for blob, fin in frames:
            out.append(inflater.feed(blob, fin))
    except Exception as exc:  # noqa: BLE001 - the class is the result
        return type(exc).__name__, b"".join(out)
    return "ok", b"".join(out)


@settings(max_examples=300, deadline=None)
@given(
    seed_message=st.binary(max_size=2000),
    mutations=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 10_000),
    limit=st.integers(0, 5000),
    garbage=st.binary(max_size=64),
)
def test_twins_agree_on_damaged_input(seed_message, mutations, cut, limit, garbage):
    """Corrupt, truncated or garbage input: both twins fail (or succeed) alike."""
    stream = bytearray(pure_deflate.Deflater().compress(seed_message))
    for position, value in mutations:
        stream[position % len(stream)] = value
    damaged = bytes(stream[: cut % (len(stream) + 1)])
    frames = [(damaged, False), (garbage, True)]
    results = {
        name: _outcome(mod.Inflater(max_message_bytes=limit, window_bits=9 + limit % 7), frames)
        for name, mod in IMPLS.items()
    }
    assert results["ext"] == results["pure"]
