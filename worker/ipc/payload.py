"""What a reply's bytes say: a result (JSON-ready post-processed outputs and timings) or an error.

Encoded with orjson (strict JSON, NaN -> null, as the result record itself), never pickled: the GPU
process sends data, not objects, so nothing it sends can run code in an intake.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from worker import errors
from worker.ipc.wire import Status


def encode_result(postprocessed: Sequence[dict[str, Any]], queue_s: float, inference_s: float,
                  batch_size: int) -> bytes:
    """The timings, then each model's outputs as JSON of its own, one per line (compact JSON has no raw
    newline: orjson escapes one in a string), so the intake can put them in its result unparsed."""
    head = orjson.dumps({"q": queue_s, "i": inference_s, "b": batch_size})
    return b"\n".join([head, *(orjson.dumps(p, option=orjson.OPT_SERIALIZE_NUMPY) for p in postprocessed)])


def decode_result(data: bytes) -> dict[str, Any]:
    """The timings as numbers, and under "p" each model's outputs as an ``orjson.Fragment``: JSON the
    result record embeds as it is. Parsing it here only to serialise it again was a tenth of the intake
    event loop's CPU per message (py-spy, docs/benchmarks.md)."""
    head, *models = data.split(b"\n")
    doc = orjson.loads(head)
    doc["p"] = [orjson.Fragment(m) for m in models]
    return doc


def encode_error(exc: BaseException) -> tuple[Status, bytes]:
    """The error's status (what the intake must do with the message) and its description."""
    if isinstance(exc, errors.PoisonMessage):
        status = Status.POISON
    elif isinstance(exc, errors.RetriableError):
        status = Status.RETRIABLE
    else:
        status = Status.FATAL
    doc = {"cls": type(exc).__name__, "reason": getattr(exc, "reason", None), "msg": str(exc),
           "cuda_error": getattr(exc, "cuda_error", None)}
    return status, orjson.dumps(doc)


def decode_error(status: Status, data: bytes) -> errors.WorkerError:
    """The exception the intake raises for the message: the same class where it is one of ours."""
    doc = orjson.loads(data)
    cls = getattr(errors, doc.get("cls") or "", None)
    msg = doc.get("msg") or "GPU process error"
    if status == Status.POISON:
        if isinstance(cls, type) and issubclass(cls, errors.PoisonMessage):
            return cls(msg, reason=doc.get("reason"))
        return errors.PoisonMessage(msg, reason=doc.get("reason"))
    if status == Status.RETRIABLE:
        if cls is errors.DeviceError:
            return errors.DeviceError(msg, cuda_error=doc.get("cuda_error") or "")
        return errors.RetriableError(msg)
    if isinstance(cls, type) and issubclass(cls, errors.FatalError):
        try:
            return cls(msg)
        except TypeError:
            pass
    return errors.FatalError(f"GPU process: {doc.get('cls')}: {msg}")
