"""One frozen settings object, built once at start-up from flags and ``WORKER_*`` variables.

Precedence (highest first): command-line flag, environment variable ``WORKER_<FIELD>``, default.
Every field's help text is its documentation: ``worker run --help`` prints them all, and the Helm
chart sets the same names as environment variables.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.choices import (
    ENV_PREFIX,
    BatchShapes,
    Choice,
    Compression,
    CudnnSearch,
    Decoder,
    Device,
    KafkaConsumer,
    KafkaProducer,
    LogFormat,
    LogLevel,
    NvImageCodecBackend,
    OffsetReset,
    ProcessingGuarantee,
    SaslMechanism,
    SecurityProtocol,
)
from worker.errors import ConfigError

__all__ = ["ENV_PREFIX", "GPU_DECODERS", "SECRET_FIELDS", "BatchShapes", "Compression", "CudnnSearch", "Decoder",
           "Device", "KafkaConsumer", "KafkaProducer", "LogFormat", "LogLevel", "OffsetReset", "ProcessingGuarantee", "SaslMechanism",
           "SecurityProtocol", "Settings", "add_arguments", "load"]
SECRET_FIELDS = frozenset({"sasl_password", "ssl_keyfile_password"})


def _opt(default: Any, help: str, choices: type[Choice] | None = None) -> Any:
    """A field; ``choices`` is the enum its value is parsed into (the field's type)."""
    return field(default=default, metadata={"help": help, "enum": choices,
                                            "choices": choices.values() if choices else None})


# decoder values that send JPEGs to the GPU process as bytes (nvImageCodec decodes them there)
GPU_DECODERS = tuple(d for d in Decoder if d.on_gpu)


@dataclass(frozen=True)
class Settings:
    # --- Kafka -----------------------------------------------------------------------------
    bootstrap_servers: str = _opt("localhost:9092", "Kafka bootstrap servers, comma separated.")
    input_topic: str = _opt("images", "Topic the image messages are read from.")
    output_topic: str = _opt("results", "Topic the inference results are written to.")
    dlq_topic: str = _opt("images.dlq", "Dead-letter topic for poison messages (payload + error headers).")
    group_id: str = _opt("gpu-worker", "Consumer group id.")
    client_id: str = _opt("gpu-worker", "Kafka client id (shows up in broker logs and quotas).")
    auto_offset_reset: OffsetReset = _opt(
        OffsetReset.EARLIEST, "Where a group with no committed offset starts.", OffsetReset
    )
    security_protocol: SecurityProtocol = _opt(
        SecurityProtocol.PLAINTEXT, "Kafka security protocol.", SecurityProtocol
    )
    sasl_mechanism: SaslMechanism = _opt(
        SaslMechanism.PLAIN, "SASL mechanism (OAUTHBEARER and GSSAPI need token/Kerberos support the worker does not have yet).",
        SaslMechanism
    )
    sasl_username: str = _opt("", "SASL user name.")
    sasl_password: str = _opt("", "SASL password (masked in logs).")
    ssl_cafile: str = _opt("", "CA bundle (PEM) that signs the brokers' certificates.")
    ssl_certfile: str = _opt("", "Client certificate (PEM) for mutual TLS.")
    ssl_keyfile: str = _opt("", "Client private key (PEM) for mutual TLS.")
    ssl_keyfile_password: str = _opt("", "Password of the client private key (masked in logs).")
    session_timeout_ms: int = _opt(30000, "Consumer group session timeout.")
    max_poll_interval_ms: int = _opt(300000, "Longest gap between polls before the group evicts us.")
    fetch_max_bytes: int = _opt(52428800, "Most bytes one fetch returns across partitions.")
    max_partition_fetch_bytes: int = _opt(8388608, "Most bytes one fetch returns per partition.")
    fetch_max_wait_ms: int = _opt(
        500, "Longest the broker may hold a fetch that has no data yet. Kafka answers as soon as data "
             "arrives; some brokers (the local tansu) hold it this long anyway, adding it to latency.")
    kafka_consumer: KafkaConsumer = _opt(
        KafkaConsumer.AIOKAFKA, "The client a live intake reads the input topic with. aiokafka parses fetch responses "
        "in Python on the intake's event loop (most of its CPU per message with images); librdkafka (the "
        "confluent-kafka package) fetches, decompresses and parses on native threads: the consumer alone took a "
        "quarter of aiokafka's CPU per 76 KB message, the intake's event loop about half (2-CPU VM, "
        "docs/benchmarks.md; not yet measured on a GPU host). Same group protocol, commits and drain on revoke. A replay "
        "and exactly-once read with aiokafka (exactly-once: librdkafka here is refused).", KafkaConsumer)
    kafka_producer: KafkaProducer = _opt(
        KafkaProducer.AIOKAFKA, "The client an intake publishes results and dead letters with. aiokafka builds "
        "record batches and produce requests in Python on the intake's event loop (with kafka_consumer=librdkafka "
        "the largest part left of its CPU per message); librdkafka (confluent-kafka) does it on native threads, "
        "the loop only hands each record over. Same partitions for a key (murmur2), acks from all in-sync "
        "replicas, the same retries, refusals and dead letters (docs/guarantees.md). Exactly-once publishes with "
        "aiokafka (librdkafka here is refused).", KafkaProducer)
    check_crcs: bool = _opt(
        True, "Check each fetched record batch's CRC-32C (Kafka's Java consumer does by default; librdkafka "
              "does not). Images make it dear: ~37 us of the intake's event loop per 76 KB message, a fifth "
              "of its loop time (docs/benchmarks.md; with kafka_consumer=librdkafka it runs on librdkafka's "
              "threads). Off trusts TCP's checksum and the broker's check at produce time, and gives up "
              "detecting corruption at rest on the broker.")
    socket_read_bytes: int = _opt(
        4194304, "Largest socket read per event-loop iteration, and the buffered bytes before aiokafka "
                 "stops reading (at least fetch_max_bytes): fetch responses of megabytes arrive in a few "
                 "reads rather than dozens of loop round trips. 0: asyncio's and aiokafka's defaults.")
    producer_linger_ms: int = _opt(5, "Producer linger: how long a result batch waits to fill.")
    producer_max_request_size: int = _opt(10485760, "Largest produce request (results and DLQ records).")
    output_compression: Compression = _opt(
        Compression.NONE, "Compression of the result and DLQ record batches we write (input batches of every codec are "
                "read whatever this says). none by default: aiokafka compresses on the event loop that feeds "
                "the GPU, and any consumer can read the results, even one without snappy/lz4/zstd libraries. "
                "Where bytes matter, zstd: the demo's 1.3 KB JSON results shrink 5x for ~7 us a result "
                "(snappy 3x, ~6 us; lz4 4x, ~60 us; gzip 5x, ~140 us). DLQ payloads are images: they barely "
                "shrink.", Compression)
    producer_max_pending: int = _opt(
        2048, "Most result/DLQ records sent but not yet acknowledged; past it sends wait."
    )
    # --- Model ----------------------------------------------------------------------------
    pipeline: str = _opt(
        "", "Model pipeline file (YAML). Empty: the bundled demo pipeline (exact-function models)."
    )
    device: Device = _opt(
        Device.AUTO, "Where inference runs: auto (CUDA if usable, else CPU), cuda, or cpu.", Device
    )
    gpu_device_index: int = _opt(0, "CUDA device index of the one GPU process (when gpu_devices is empty).")
    gpu_devices: str = _opt(
        "", "One GPU process per device, fed by the same intakes (each request to the GPU with the least "
            "outstanding work): auto (every device the CUDA driver shows), a list of CUDA indices (0,1), or "
            "cpu:N (N processes on the CPU runtime with device=cpu: a test and development aid). Empty: one "
            "GPU process on gpu_device_index.")
    max_batch_size: int = _opt(32, "Largest micro-batch sent to the models.")
    max_wait_ms: float = _opt(5.0, "Longest a request waits for its micro-batch to fill.")
    ort_arena: bool = _opt(True, "ONNX Runtime CUDA provider: use its memory arena.")
    ort_cudnn_search: CudnnSearch = _opt(
        CudnnSearch.HEURISTIC, "ONNX Runtime cuDNN convolution algorithm search.", CudnnSearch
    )
    ort_batch_shapes: BatchShapes = _opt(
        BatchShapes.MAX, "ONNX Runtime CUDA provider: batch shapes the model runs at. max: every batch padded to "
               "max_batch_size (one session, one shape). pow2: padded to the next power of two, with a "
               "session per shape (ORT re-prepares a session's convolutions whenever its input shape "
               "changes, ~100 ms for ResNet-50, so each session keeps one): a batch of 40 costs a batch of "
               "64, not of max_batch_size, for a copy of the weights and of the working memory per shape "
               "and a longer start.", BatchShapes
    )
    engine_cache_dir: str = _opt(
        "", "Where TensorRT engines built from ONNX files are cached. Empty: ~/.cache/gpu-worker/engines."
    )
    trt_workspace_bytes: int = _opt(
        0, "TensorRT builder workspace limit in bytes (IBuilderConfig.set_memory_pool_limit(WORKSPACE)): the "
           "most scratch memory a layer's kernels may use, so larger allows faster tactics. Part of the engine "
           "cache key. 0: TensorRT's default (the device's memory).")
    gil_switch_interval_ms: float = _opt(
        0.0, "Python's GIL switch interval (sys.setswitchinterval), in every process of the worker. The GPU "
             "thread drops the GIL in every CUDA and ONNX Runtime call and must win it back from the GPU "
             "process's link threads each time (in an intake: the event loop from the decode threads); a "
             "shorter interval hands it back sooner. 0: leave Python's default (5 ms).")
    cuda_max_connections: int = _opt(
        32, "Hardware work queues per CUDA context (sets CUDA_DEVICE_MAX_CONNECTIONS before the driver starts, "
            "unless the environment already has it; 1..32, 0: the driver's default of 8). nvImageCodec decodes "
            "on 14 streams of its own; with 8 queues they share ours and the card's JPEG decode waited for the "
            "inference before it (H100: 25.3 -> 22.5 ms per 128 images decoded beside inference; "
            "docs/benchmarks.md, run 18).")
    gpu_batches_in_flight: int = _opt(
        2, "Batches the GPU thread keeps queued on the device (1 or 2). With 2, when the next full batch is "
           "already waiting it is queued behind the running one before the thread waits, so the device does "
           "not idle while results are handed over and the next inputs written. The CPU runtime uses 1 "
           "(its models run as they are queued; a second batch would only delay results).")
    gpu_batches_by_decoder: bool = _opt(
        True, "With decoder hybrid: when the JPEGs to decode on the card, or the images the intakes decoded, "
              "fill a batch on their own, run them as a batch apart (a batch that closes on max_wait_ms still "
              "mixes them). A batch with any card-decoded JPEG costs the card's decode on top of inference; a "
              "batch of decoded rows does not (H100: 27 vs 24 ms per 128 with 8 hardware queues, 24.8 vs 24.0 "
              "with cuda_max_connections 32; docs/benchmarks.md, runs 14 and 18).")
    gpu_decode_thread: bool = _opt(
        False, "With decoder nvimgcodec or hybrid: the next full batch's nvImageCodec decode call runs on a second "
               "thread of the GPU process (the primary context current there too) while the GPU thread queues "
               "this batch's models and waits for the one before, instead of on the GPU thread between batches. "
               "For hosts where the GPU thread is host-bound (its phase timers: little 'wait', much 'prefetch'). "
               "Off by default: on an H100 it changed nothing in fp32 and lost 9-11 per cent in fp16, whose faster GPU "
               "side then drained the queue into more padded partial batches (docs/benchmarks.md, run 20).")
    # --- Decode ---------------------------------------------------------------------------
    decode_workers: int = _opt(0, "Decode threads per intake process. 0: the CPUs this process may use, "
                                  "shared among the intake processes.")
    decode_nice: int = _opt(
        10, "Nice value the intakes' decode threads lower themselves to (Linux, per thread; 0..19, 0: unchanged). "
            "When decoding takes every core, the GPU process's thread and the intakes' event loops (Kafka I/O, "
            "heartbeats) then run first: the GPU thread's kernel launches are what keeps the card busy (H100, "
            "hybrid: 4,401 -> 4,691 images/s with 10).")
    intake_processes: int = _opt(
        0, "Intake processes (each an aiokafka consumer in the group, with its own decode pool, publisher "
           "and committer) feeding the one GPU-owning process through shared memory. 0: derived from the "
           "CPUs this process may use (1 on a machine of up to 2).")
    decoder: Decoder = _opt(
        Decoder.CPU, "Image decoder: cpu (OpenCV), cpu-reduced (DCT-domain downscaled JPEG decode), nvimgcodec "
               "(nvImageCodec on the GPU thread, resized on the device; images it cannot decode go to OpenCV; "
               "without a GPU, nvImageCodec or NVRTC: cpu-reduced), or hybrid (nvimgcodec, and each intake's "
               "decode threads take JPEGs too, cpu-reduced: CPU cores that would idle take decoding off the GPU "
               "process).",
        Decoder,
    )
    hybrid_queue_per_thread: int = _opt(
        32, "With decoder hybrid: JPEGs queued per decode thread of an intake before the next ones go to the "
            "card as bytes. Higher: more of the decoding on the CPU, more latency in the queue; 32 measured best "
            "on an H100 host of 16 cores with 8 hardware queues (docs/benchmarks.md, run 14).")
    hybrid_card_below: int = _opt(
        32, "With decoder hybrid: while fewer than this many of an intake's images wait at the GPU process (no "
            "backlog there), its JPEGs go to the card and its decode threads stay idle; from this many on, the "
            "decode threads take them while they have room (hybrid_queue_per_thread), as at the peak. 0: the "
            "decode threads first whenever they have room, which below the peak is every JPEG. 32 measured on an "
            "H100 (docs/benchmarks.md, run 27): the peak unchanged (0.866-0.922x against 0.861-0.913x), at half "
            "load intake CPU 1.70-1.83 ms per image against 3.87-4.17 and p99 137-153 ms against 160-600.")
    nvimgcodec_backend: NvImageCodecBackend = _opt(
        NvImageCodecBackend.DEFAULT, "With decoder nvimgcodec or hybrid: which nvImageCodec decoders may take "
        "JPEGs: default (its own choice), hardware (the card's JPEG engines only; what they refuse is decoded "
        "by OpenCV), cuda (nvJPEG's CUDA kernels only). On an H200 default and hardware measured the same, and "
        "cuda cannot be created there (the worker then decodes on the CPU): docs/benchmarks.md, run 10.",
        NvImageCodecBackend)
    nvimgcodec_options: str = _opt(
        "", "With decoder nvimgcodec or hybrid: nvImageCodec's options string, passed as given (its 'Codec "
            "options': space-separated entries such as nvjpeg_hw_decoder:preallocate_buffers=true).")
    max_bytes: int = _opt(20_000_000, "Largest accepted message value in bytes; larger ones go to the DLQ.")
    max_pixels: int = _opt(
        40_000_000, "Largest accepted width*height, read from the header before decoding (bomb guard)."
    )
    max_jpeg_scans: int = _opt(
        100, "Most scans a JPEG may have, counted before decoding; more go to the DLQ (decode_bomb). Each scan "
             "can cost the decoder a pass over the whole image; encoders write 1 to 3 (baseline) or about 10 "
             "(progressive).")
    ipc_slots: int = _opt(
        256, "Slots of each intake's shared-memory ring: images handed to the GPU process and not yet "
             "answered. A full ring makes the intake wait (backpressure), it never grows.")
    ipc_slot_bytes: int = _opt(
        262144, "Bytes of one ring slot (an encoded JPEG, or the decoded rows of every model). A larger "
                "image travels in a segment of its own. Shared memory in use: intakes x slots x this "
                "(the chart sizes /dev/shm from it).")
    # --- Flow control and commits ---------------------------------------------------------
    max_in_flight: int = _opt(1024, "Most messages consumed but not yet finished; past it partitions pause.")
    resume_in_flight: int = _opt(0, "Resume paused partitions below this many in flight. 0: half of max_in_flight.")
    max_in_flight_bytes: int = _opt(
        536870912, "Most value bytes of messages consumed but not yet finished, per intake process; past it "
                   "partitions pause, and they resume at half. A fetched message that does not fit waits "
                   "(at most one fetch's worth: fetch_max_bytes); one larger than the whole bound starts "
                   "alone. 0: no byte bound (max_in_flight x max_bytes then bounds it). The chart derives "
                   "it from the memory limit.")
    max_uncommitted_span: int = _opt(
        0, "Most finished messages kept behind an unfinished lower offset of their partition (they cannot be "
           "committed before it); past it partitions pause, so a message that never finishes cannot grow "
           "the offset tracker without bound. 0: 10 x max_in_flight.")
    message_deadline_s: float = _opt(
        300.0, "A message unfinished this long (not counting time the broker is unreachable or publishing "
               "is stalled) is a fatal error naming its topic, partition and offset: exit 1, and the "
               "restart redoes it. Keep it above the longest a healthy message can take (decode, GPU "
               "queue behind max_in_flight, batch, publish retries: docs/guarantees.md). 0: off.")
    commit_interval_ms: int = _opt(1000, "How often finished offsets are committed.")
    processing_guarantee: ProcessingGuarantee = _opt(
        ProcessingGuarantee.AT_LEAST_ONCE,
        "at-least-once: offsets committed after the results' acks (a crash may repeat some results). "
        "exactly-once: each commit cycle writes the finished prefix's results and DLQ records and the input "
        "offsets in one Kafka transaction (one transactional producer per intake), so consumers reading "
        "with isolation_level=read_committed see each input's result once, even across kill -9; needs a "
        "broker with transactions (not the embedded tansu).", ProcessingGuarantee)
    drain_timeout_s: float = _opt(20.0, "On SIGTERM, how long in-flight work may take to finish.")
    rebalance_timeout_s: float = _opt(10.0, "On partition revoke, how long in-flight work may take.")
    # --- Operations -----------------------------------------------------------------------
    http_port: int = _opt(8080, "Port of /healthz, /readyz and /metrics. 0: no HTTP server.")
    log_format: LogFormat = _opt(LogFormat.AUTO, "Log format: auto (console on a terminal, else JSON), json, console.",
                                 LogFormat)
    log_level: LogLevel = _opt(LogLevel.INFO, "Log level.", LogLevel)

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):  # the typed value from here on: flag, variable, override or replace
            kind = f.metadata.get("enum")
            if kind is not None:
                try:
                    object.__setattr__(self, f.name, kind.parse(getattr(self, f.name), f.name))
                except ConfigError as exc:
                    problems.append(str(exc))
        for name in ("max_batch_size", "max_in_flight", "commit_interval_ms", "producer_max_pending", "ipc_slots",
                     "ipc_slot_bytes", "max_jpeg_scans", "hybrid_queue_per_thread"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms", "gil_switch_interval_ms", "drain_timeout_s", "rebalance_timeout_s", "decode_workers",
                     "max_bytes", "max_pixels", "resume_in_flight", "http_port", "socket_read_bytes",
                     "intake_processes", "max_in_flight_bytes", "max_uncommitted_span", "hybrid_card_below",
                     "message_deadline_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.cuda_max_connections <= 32:
            problems.append(f"cuda_max_connections must be 0..32 (0: the driver's default), "
                            f"got {self.cuda_max_connections}")
        if not 0 <= self.decode_nice <= 19:
            problems.append(f"decode_nice must be 0..19 (a lower priority only), got {self.decode_nice}")
        from worker.gpu.devices import parse as parse_gpu_devices

        try:
            parse_gpu_devices(self.gpu_devices)  # the syntax here; "auto" is resolved when the worker starts
        except ConfigError as exc:
            problems.append(str(exc))
        from worker.engines.base import HOST_SETS  # the host buffer sets bound it (numpy: imported late)

        if not 1 <= self.gpu_batches_in_flight <= HOST_SETS:
            problems.append(f"gpu_batches_in_flight must be 1..{HOST_SETS}, got {self.gpu_batches_in_flight}")
        if (self.kafka_consumer is KafkaConsumer.LIBRDKAFKA
                and self.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE):
            problems.append("kafka_consumer=librdkafka cannot be combined with processing_guarantee=exactly-once "
                            "(its transactions commit offsets with aiokafka's group membership): use aiokafka")
        if (self.kafka_producer is KafkaProducer.LIBRDKAFKA
                and self.processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE):
            problems.append("kafka_producer=librdkafka cannot be combined with processing_guarantee=exactly-once "
                            "(its transactions are aiokafka's): use aiokafka")
        if self.resume_in_flight > self.max_in_flight:
            problems.append(
                f"resume_in_flight={self.resume_in_flight} must not exceed max_in_flight={self.max_in_flight}"
            )
        if problems:
            raise ConfigError("invalid settings: " + "; ".join(problems))

    # --- derived values -------------------------------------------------------------------
    @property
    def resume_threshold(self) -> int:
        return self.resume_in_flight or max(1, self.max_in_flight // 2)

    @property
    def uncommitted_span_bound(self) -> int:
        return self.max_uncommitted_span or 10 * self.max_in_flight

    @property
    def intakes(self) -> int:
        """Intake processes: the setting, or derived from the CPUs this process may use."""
        from worker.policy.cpus import intake_processes_for, usable_cpus

        return self.intake_processes or intake_processes_for(usable_cpus())

    @property
    def decodes_on_gpu(self) -> bool:
        """JPEGs are sent to the GPU process as bytes and decoded there (all of them, or with hybrid,
        those no intake decode thread is free for)."""
        return self.decoder.on_gpu

    @property
    def cpu_decode_reduced(self) -> bool:
        """JPEGs decoded on the CPU are decoded downscaled (cpu-reduced; the CPU share and the fall back of
        the GPU decoders too)."""
        return self.decoder is Decoder.CPU_REDUCED or self.decoder.on_gpu

    @property
    def decode_threads(self) -> int:
        """Decode threads per intake: the setting, or the usable CPUs shared among the intakes."""
        from worker.policy.cpus import decode_threads_for, usable_cpus

        return self.decode_workers or decode_threads_for(usable_cpus(), self.intakes)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes``; plain strings for choice fields are parsed as at load."""
        return dataclasses.replace(self, **changes)

    def masked(self) -> dict[str, Any]:
        """The effective settings for the start-up log line, secrets masked."""
        out = dataclasses.asdict(self)
        for name in SECRET_FIELDS:
            if out[name]:
                out[name] = "***"
        return out

    def kafka_common(self) -> dict[str, Any]:
        """Connection and security options shared by consumer, producer and admin client."""
        opts: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol.value,
        }
        if self.security_protocol.uses_tls:
            from aiokafka.helpers import create_ssl_context

            opts["ssl_context"] = create_ssl_context(
                cafile=self.ssl_cafile or None,
                certfile=self.ssl_certfile or None,
                keyfile=self.ssl_keyfile or None,
                password=self.ssl_keyfile_password or None,
            )
        if self.security_protocol.uses_sasl:
            opts["sasl_mechanism"] = self.sasl_mechanism.value
            opts["sasl_plain_username"] = self.sasl_username or None
            opts["sasl_plain_password"] = self.sasl_password or None
        return opts


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _convert(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        raise ConfigError(f"{f.name}: cannot read {raw!r} as {kind} (flag --{f.name.replace('_', '-')} "
                          f"or env {_env_name(f.name)})") from None
    return raw


def add_arguments(parser: argparse.ArgumentParser, exclude: frozenset[str] = frozenset()) -> None:
    """One flag per field; defaults stay None so that unset flags fall through to the environment."""
    group = parser.add_argument_group("settings (each also read from env WORKER_<NAME>)")
    for f in dataclasses.fields(Settings):
        if f.name in exclude:
            continue
        choices = f.metadata.get("choices")
        extra = f" One of: {', '.join(choices)}." if choices else ""
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar="STR" if choices else (f.type if isinstance(f.type, str) else f.type.__name__).upper(),
            help=f"{f.metadata['help']}{extra} [env {_env_name(f.name)}; default {f.default!r}]",
        )


def load(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
         **overrides: Any) -> Settings:
    """Build the settings: flags over environment over defaults; ``overrides`` win over all."""
    environ = os.environ if environ is None else environ
    flags = flags or {}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = flags.get(f.name)
        if raw is None:
            raw = environ.get(_env_name(f.name))
        if raw is not None:
            values[f.name] = _convert(f, raw) if isinstance(raw, str) else raw
    values.update(overrides)
    return Settings(**values)
