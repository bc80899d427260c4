"""Kafka's record-batch codecs: a start-up check that each one works, and a clear word when one does not.

Kafka compresses whole record batches, not messages: a producer picks none, gzip, snappy, lz4 or zstd
(librdkafka, Kafka Connect and most Java producers pick one of the last three), the broker stores the
batch as it came, and the consumer decompresses it inside ``getmany``. aiokafka reads gzip with the
standard library and the other three with ``cramjam``; without it a snappy batch raises
``UnsupportedCodecError`` in the consume stage, the worker exits, and a restart dies at the same offset.

So ``check_codecs`` round-trips a small payload through every codec before any client starts and stops
start-up with a ``ConfigError`` that names what is missing and how to install it; ``explain`` turns an
``UnsupportedCodecError`` that still reaches the consume stage (a codec id this aiokafka does not know)
into the same kind of message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from aiokafka import codec as _aiokafka_codec

from worker.errors import ConfigError

# The values of the output_compression setting; "none" is the producer's compression_type=None.
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")

INSTALL_HINT = ("pip install 'cramjam>=2.8.0' (a dependency of gpu-kafka-worker: reinstall the package, "
                "or pip install 'aiokafka[all]')")

# What each codec needs, for the error message.
NEEDS = {"gzip": "Python's zlib module (part of the standard library)", "snappy": "cramjam",
         "lz4": "cramjam", "zstd": "cramjam"}

Encode = Callable[[bytes], bytes]
Decode = Callable[[bytes], bytes]


def aiokafka_codecs() -> dict[str, tuple[Encode, Decode]]:
    """The encode/decode pairs aiokafka itself uses for record batches."""
    c = _aiokafka_codec
    return {"gzip": (c.gzip_encode, c.gzip_decode), "snappy": (c.snappy_encode, c.snappy_decode),
            "lz4": (c.lz4_encode, c.lz4_decode), "zstd": (c.zstd_encode, c.zstd_decode)}


# Long enough to span more than one xerial snappy block (32 KiB) and to compress at all.
_PROBE = b"gpu-kafka-worker codec probe " * 2048


def check_codecs(table: Mapping[str, tuple[Encode, Decode]] | None = None) -> list[str]:
    """Round-trip a payload through each codec; raise ``ConfigError`` naming every one that fails.

    ``table`` defaults to aiokafka's codecs (tests pass their own to simulate a missing library).
    Returns the names checked.
    """
    table = aiokafka_codecs() if table is None else table
    broken: list[str] = []
    for name, (encode, decode) in table.items():
        try:
            ok = decode(encode(_PROBE)) == _PROBE
            why = "" if ok else "round trip changed the bytes"
        except Exception as exc:  # noqa: BLE001 - NotImplementedError, ImportError, a broken wheel: all the same here
            ok, why = False, f"{type(exc).__name__}: {exc}"
        if not ok:
            broken.append(f"{name} ({why}; needs {NEEDS.get(name, 'its library')})")
    if broken:
        raise ConfigError(
            "Kafka compression codecs do not work: " + ", ".join(broken) + ". A record batch compressed "
            "with one of them (the default of many producers: librdkafka, Kafka Connect, Java clients) "
            f"would stop the consumer at that offset on every restart. Fix: {INSTALL_HINT}.")
    return list(table)


def producer_compression(setting: str) -> str | None:
    """The AIOKafkaProducer ``compression_type`` for the output_compression setting."""
    return None if setting == "none" else str(setting)  # aiokafka gets the plain name, not the enum member


def explain(exc: BaseException) -> BaseException:
    """An ``UnsupportedCodecError`` from the consumer becomes a ``ConfigError`` that says what to
    install (the original chained as its cause); any other exception is returned unchanged."""
    from aiokafka.errors import UnsupportedCodecError

    if not isinstance(exc, UnsupportedCodecError):
        return exc
    err = ConfigError(
        f"a record batch on the input topic cannot be decompressed ({exc}). The worker reads none, gzip, "
        f"snappy, lz4 and zstd; snappy, lz4 and zstd need cramjam: {INSTALL_HINT}. An unknown codec id "
        "needs a newer aiokafka. The batch stays uncommitted; a restart reads it again.")
    err.__cause__ = exc
    return err
