"""What the intake's librdkafka clients share (worker.intake.rdkafka_consumer, .rdkafka_producer): the
connection and security options from the settings, librdkafka's log lines through the worker's log, and
librdkafka's errors as the aiokafka errors the worker's handlers already tell apart.
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka import errors as E

from worker.errors import ConfigError


def connection_config(settings: Any) -> dict[str, Any]:
    """Broker addresses, client id and security: the same as the aiokafka clients get (pure)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "security.protocol": str(settings.security_protocol),
    }
    if settings.security_protocol.uses_tls:
        for key, value in (("ssl.ca.location", settings.ssl_cafile), ("ssl.certificate.location", settings.ssl_certfile),
                           ("ssl.key.location", settings.ssl_keyfile), ("ssl.key.password", settings.ssl_keyfile_password)):
            if value:
                conf[key] = value
    if settings.security_protocol.uses_sasl:
        conf["sasl.mechanism"] = str(settings.sasl_mechanism)
        conf["sasl.username"] = settings.sasl_username
        conf["sasl.password"] = settings.sasl_password
    return conf


class Logs:
    """librdkafka's log lines through the worker's structured log (by default they go raw to stderr)."""

    def __init__(self, logger: Any) -> None:
        self._log = logger

    def log(self, level: int, fmt: str, *args: Any) -> None:
        text = fmt % args if args else fmt
        if level >= logging.WARNING:
            self._log.warning("librdkafka", message=text)
        else:
            self._log.debug("librdkafka", message=text)


def new_client(cls: Any, conf: dict[str, Any], setting: str, on_error: Any = None, logger: Any = None) -> Any:
    """A confluent-kafka client of ``cls``, its errors and log lines through the worker where given; a
    configuration librdkafka refuses (it checks here) is a ``ConfigError`` naming ``setting``."""
    import confluent_kafka

    hooks = {**({"error_cb": on_error} if on_error else {}), **({"logger": Logs(logger)} if logger else {})}
    try:
        return cls({**conf, **hooks})
    except confluent_kafka.KafkaException as exc:
        raise ConfigError(f"{setting}=librdkafka: librdkafka refused the configuration: {text(exc)}") from None


async def reach_broker(list_topics: Any, conf: dict[str, Any], timeout_s: float) -> None:
    """Await ``list_topics`` (a metadata round trip, started on the client's own thread): no broker answering
    is a ``KafkaConnectionError``, which the worker's connect loop retries, as after aiokafka's start()."""
    import confluent_kafka

    try:
        await list_topics(timeout_s)
    except confluent_kafka.KafkaException as exc:
        raise E.KafkaConnectionError(f"librdkafka: no broker answered at {conf['bootstrap.servers']}: "
                                     f"{text(exc)}") from None


def text(exc: BaseException) -> str:
    """The message of a confluent-kafka ``KafkaException`` (its first argument is a ``KafkaError``)."""
    error = exc.args[0] if exc.args else None
    return error.str() if hasattr(error, "str") else str(exc)


def as_aiokafka(error: Any) -> E.KafkaError:
    """A librdkafka ``KafkaError`` as the aiokafka error of the same meaning (worker.intake.publish's
    ``classify`` tells permanent, missing and retriable apart on these). A broker's refusal keeps its
    Kafka error code (aiokafka's class for it); librdkafka's own (negative) codes map to the nearest
    aiokafka error; anything else is a plain ``KafkaError``, which is retried."""
    import confluent_kafka

    code, message = error.code(), f"{error.name()}: {error.str()}"
    K = confluent_kafka.KafkaError
    local = {
        K._UNKNOWN_TOPIC: E.UnknownTopicOrPartitionError,
        K._UNKNOWN_PARTITION: E.UnknownTopicOrPartitionError,
        K._MSG_TIMED_OUT: E.KafkaTimeoutError,
        K._TIMED_OUT: E.KafkaTimeoutError,
        K._TIMED_OUT_QUEUE: E.KafkaTimeoutError,
        K._TRANSPORT: E.KafkaConnectionError,
        K._ALL_BROKERS_DOWN: E.KafkaConnectionError,
        K._RESOLVE: E.KafkaConnectionError,
        K._AUTHENTICATION: E.AuthenticationFailedError,
        K._SSL: E.KafkaConnectionError,
        K._INVALID_ARG: E.KafkaConfigurationError,
        K._UNSUPPORTED_FEATURE: E.UnsupportedVersionError,
        K._QUEUE_FULL: E.KafkaTimeoutError,
        K._DESTROY: E.ProducerClosed,  # closing with records queued
        K._PURGE_QUEUE: E.ProducerClosed,
        K._PURGE_INFLIGHT: E.ProducerClosed,
    }
    if code in local:
        return local[code](message)
    if error.fatal():  # librdkafka's client cannot go on: permanent (classify), as a closed producer
        return E.ProducerClosed(f"librdkafka fatal error: {message}")
    if code > 0:  # the broker's own error code
        cls = E.for_code(code)
        if cls is not E.UnknownError or code == E.UnknownError.errno:
            return cls(message)
    return E.KafkaError(message)
