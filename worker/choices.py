"""The settings that take one of a few values, as enums parsed where they enter (worker.settings).

Each is a ``str`` enum: a member equals, hashes and prints as its value, so ``settings.decoder ==
"nvimgcodec"``, a dict keyed by the value and an f-string all keep working, and aiokafka and ONNX Runtime
receive the string they expect. ``parse`` is the one place a raw flag, variable or override becomes a
member; anything else is a ``ConfigError`` naming the setting, its flag and variable, and the values.
"""

from __future__ import annotations

import enum
from typing import Any

from worker.errors import ConfigError

ENV_PREFIX = "WORKER_"


class Choice(str, enum.Enum):
    """A setting's allowed values; matched ignoring case and surrounding blanks."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, raw: Any, name: str) -> Any:
        if isinstance(raw, cls):
            return raw
        if isinstance(raw, str):
            key = raw.strip().casefold()
            for member in cls:
                if member.value.casefold() == key:
                    return member
        raise ConfigError(f"{name}={raw!r} is not one of {', '.join(cls.values())} "
                          f"(flag --{name.replace('_', '-')} or env {ENV_PREFIX}{name.upper()})")

    def __repr__(self) -> str:  # --help prints defaults with repr, and the start-up log the plain value
        return repr(self.value)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class OffsetReset(Choice):
    EARLIEST = "earliest"
    LATEST = "latest"


class SecurityProtocol(Choice):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"

    @property
    def uses_tls(self) -> bool:
        return self in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL)

    @property
    def uses_sasl(self) -> bool:
        return self in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL)


class SaslMechanism(Choice):
    # OAUTHBEARER and GSSAPI need token/Kerberos support the worker does not have
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


class KafkaConsumer(Choice):
    """kafka_consumer: which client reads the input topic in a live intake (worker.intake.rdkafka_consumer)."""

    AIOKAFKA = "aiokafka"  # pure Python on the intake's event loop
    LIBRDKAFKA = "librdkafka"  # confluent-kafka: fetch, decompression and parsing on native threads


class KafkaProducer(Choice):
    """kafka_producer: which client publishes an intake's results and dead letters (worker.intake.rdkafka_producer)."""

    AIOKAFKA = "aiokafka"  # pure Python on the intake's event loop
    LIBRDKAFKA = "librdkafka"  # confluent-kafka: batching, requests and acks on native threads


class Compression(Choice):
    """output_compression; NONE is the producer's compression_type=None (worker.codecs)."""

    NONE = "none"
    GZIP = "gzip"
    SNAPPY = "snappy"
    LZ4 = "lz4"
    ZSTD = "zstd"


class Device(Choice):
    AUTO = "auto"  # CUDA if usable, else the CPU
    CUDA = "cuda"
    CPU = "cpu"


class CudnnSearch(Choice):
    """ONNX Runtime's cudnn_conv_algo_search provider option."""

    EXHAUSTIVE = "EXHAUSTIVE"
    HEURISTIC = "HEURISTIC"
    DEFAULT = "DEFAULT"


class BatchShapes(Choice):
    """The batch shapes an ONNX Runtime CUDA session runs at (worker.policy.batching.batch_buckets)."""

    MAX = "max"  # every batch padded to max_batch_size
    POW2 = "pow2"  # padded to the next power of two


class Decoder(Choice):
    CPU = "cpu"  # OpenCV in each intake's decode pool
    CPU_REDUCED = "cpu-reduced"  # DCT-domain downscaled JPEG decode, on the CPU
    NVIMGCODEC = "nvimgcodec"  # JPEGs decoded on the GPU thread
    HYBRID = "hybrid"  # nvimgcodec, plus idle intake decode threads (cpu-reduced)

    @property
    def on_gpu(self) -> bool:
        """JPEGs travel to the GPU process as bytes and are decoded there (with hybrid: some of them)."""
        return self in (Decoder.NVIMGCODEC, Decoder.HYBRID)


class NvImageCodecBackend(Choice):
    """Which of nvImageCodec's decoders may take the JPEGs (worker.decode.nvimgcodec.decoder_kwargs)."""

    DEFAULT = "default"  # every backend, nvImageCodec's own choice per image
    HARDWARE = "hardware"  # the card's JPEG decoder engines only (HW_GPU_ONLY); what they refuse: OpenCV
    CUDA = "cuda"  # nvJPEG's CUDA kernels only (GPU_ONLY): they share the SMs with inference


class ProcessingGuarantee(Choice):
    """What a consumer of the output topics may rely on (docs/guarantees.md)."""

    AT_LEAST_ONCE = "at-least-once"  # commit after the ack: a crash can repeat results, never lose one
    EXACTLY_ONCE = "exactly-once"  # results and input offsets in one Kafka transaction (read_committed)

    @classmethod
    def parse(cls, raw: Any, name: str = "processing_guarantee") -> Any:
        return super().parse(raw, name)


class LogFormat(Choice):
    AUTO = "auto"  # console on a terminal, else JSON
    JSON = "json"
    CONSOLE = "console"


class LogLevel(Choice):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
