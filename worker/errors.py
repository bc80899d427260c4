"""A small error tree. Each class says what the flow must do with the message that raised it.

- ``PoisonMessage``: the input itself is bad; retrying cannot help. It goes to the dead-letter topic with
  ``reason`` (a stable, machine-readable code) and the message text in headers, and then counts as done.
- ``RetriableError``: the input is fine but we could not finish it (device error, broker trouble). Its
  offset is never committed, so a restart redoes it.
- ``FatalError``: the process cannot go on (engine will not load or fails on a known-good input, a topic
  cannot be written, a stage crashed). Exit non-zero; what it held stays uncommitted.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the worker raises on purpose."""

    retriable = False
    poison = False


class ConfigError(WorkerError):
    """Bad settings or pipeline file: stop start-up with the message."""


class PoisonMessage(WorkerError):
    """The message can never be processed; it belongs in the dead-letter topic."""

    poison = True
    reason = "poison"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class EmptyValue(PoisonMessage):
    reason = "empty_value"


class TooLarge(PoisonMessage):
    reason = "too_large"


class UnsupportedImage(PoisonMessage):
    reason = "unsupported_image"


class UndecodableImage(PoisonMessage):
    reason = "undecodable_image"


class TruncatedImage(UndecodableImage):
    """The coded data is far shorter than any encoder makes for the pixels its header declares (a 785-byte
    JPEG that says 6000x6000): decoding would give a gray fill, not the picture. Found before decoding."""

    reason = "truncated_image"


class DecodeBomb(TooLarge):
    """Small and within the pixel limit, but built to make the decoder work out of all proportion (a
    progressive JPEG of thousands of scans, each one a pass over every block of the image)."""

    reason = "decode_bomb"


class MalformedEnvelope(PoisonMessage):
    reason = "malformed_envelope"


class ModelRejectedInput(PoisonMessage):
    """The model raised on this input alone (found by retrying a failed batch item by item)."""

    reason = "model_error"


class RetriableError(WorkerError):
    retriable = True


class DeviceError(RetriableError):
    """A CUDA error: the batch fails as retriable and the process exits so a restart redoes it."""

    def __init__(self, message: str, cuda_error: str = "") -> None:
        super().__init__(message)
        self.cuda_error = cuda_error


class FatalError(WorkerError):
    """The process cannot continue."""


class SharedMemoryFull(FatalError, ConfigError):
    """/dev/shm has no room for a segment. For the rings, found at start-up: a configuration error (the
    container's /dev/shm is smaller than intakes x ipc_slots x ipc_slot_bytes). For an image larger than a
    slot, at run time: the worker stops, nothing of the image committed."""


class EngineLoadError(FatalError, ConfigError):
    """A model or engine cannot be loaded: start-up stops with this message."""


class EngineFailure(FatalError):
    """The engine fails whatever the input (a known-good input fails too, or every input of a batch
    fails alone): not poison. The worker stops non-zero; nothing of the batch is committed or
    dead-lettered, so a restart (or a fixed engine) redoes it."""


class PublishFailed(FatalError):
    """A record can never be written to ``topic`` (invalid name, not authorised, missing past a bound):
    retrying cannot help. The worker stops non-zero; the message stays uncommitted."""

    def __init__(self, topic: str, reason: str, advice: str = "") -> None:
        super().__init__(f"cannot write to topic {topic!r}: {reason}" + (f"; {advice}" if advice else ""))
        self.topic = topic
        self.reason = reason


class UnwritableTopic(PublishFailed, ConfigError):
    """Found at start-up, before anything is consumed: the output or dead-letter topic cannot be written."""
