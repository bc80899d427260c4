"""Authentication against Apache Kafka (the Kafka tier): SASL_SSL with SCRAM-SHA-512 and PLAIN, TLS with
the system trust store or a given CA, mutual TLS. tansu has no SASL and no TLS to test against.

Each case runs the worker in-process over the secured listener, with inputs produced and results read
over the PLAINTEXT listener (an independent path), and checks every input got its own exact result.
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from tests.helpers import check_demo_result, produce, read_all, result_doc, source_of
from tests.test_end_to_end import lossless_images
from worker.broker import create_topics
from worker.service import serve
from worker.settings import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

N = 40


def secured(kafka, topics, **security) -> Settings:
    return Settings(input_topic=topics["input"], output_topic=topics["output"], dlq_topic=topics["dlq"],
                    group_id=topics["group"], http_port=0, device="cpu", max_batch_size=16, max_wait_ms=5.0,
                    decode_workers=2, commit_interval_ms=200, drain_timeout_s=10.0, log_format="json",
                    log_level="warning", **security)


@pytest.fixture
def kafka_topics(kafka):
    import uuid

    tag = uuid.uuid4().hex[:8]
    t = {"input": f"auth-in-{tag}", "output": f"auth-out-{tag}", "dlq": f"auth-dlq-{tag}", "group": f"g-{tag}"}
    asyncio.run(create_topics(kafka.bootstrap, [(t["input"], 2), (t["output"], 2), (t["dlq"], 1)]))
    return t


async def flows(kafka, settings: Settings) -> None:
    """N inputs in (over PLAINTEXT), the worker over ``settings``' listener, N exact results out."""
    blobs, pixels = lossless_images(N, seed=7)
    coords = await produce(kafka.bootstrap, settings.input_topic, blobs, 2)
    workers: list = []
    task = asyncio.create_task(serve(settings, worker_out=workers))
    try:
        records = await read_all(kafka.bootstrap, settings.output_topic, N, timeout_s=120, settle_s=0.5)
    finally:
        if workers:
            workers[0].request_stop()
        code = await asyncio.wait_for(task, 60)
    assert code == 0
    by_coord = dict(zip(coords, pixels))
    assert sorted(source_of(r) for r in records) == sorted(coords)
    for rec in records:
        check_demo_result(result_doc(rec), by_coord[source_of(rec)])


def scram(kafka, password=None) -> dict:
    return dict(bootstrap_servers=kafka.sasl_ssl, security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                sasl_username="alice", sasl_password=password or kafka.users["alice"],
                ssl_cafile=str(kafka.certs["ca"]))


async def test_sasl_ssl_scram_sha_512(kafka, kafka_topics):
    await flows(kafka, secured(kafka, kafka_topics, **scram(kafka)))


async def test_sasl_ssl_plain(kafka, kafka_topics):
    await flows(kafka, secured(kafka, kafka_topics, bootstrap_servers=kafka.sasl_ssl, security_protocol="SASL_SSL",
                               sasl_mechanism="PLAIN", sasl_username="alice", sasl_password=kafka.users["alice"],
                               ssl_cafile=str(kafka.certs["ca"])))


async def test_tls_with_the_given_ca(kafka, kafka_topics):
    await flows(kafka, secured(kafka, kafka_topics, bootstrap_servers=kafka.ssl, security_protocol="SSL",
                               ssl_cafile=str(kafka.certs["ca"])))


async def test_tls_without_ssl_cafile_uses_the_system_trust_store(kafka, kafka_topics, monkeypatch, caplog):
    """No ``ssl_cafile``: the system store decides. Our test CA in it (SSL_CERT_FILE, which OpenSSL reads as
    the default store) → it works; the real system store does not know the CA → verification fails."""
    settings = secured(kafka, kafka_topics, bootstrap_servers=kafka.ssl, security_protocol="SSL")
    with pytest.raises(KafkaConnectionError):
        await _producer_start(settings)
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    monkeypatch.setenv("SSL_CERT_FILE", str(kafka.certs["ca"]))
    await flows(kafka, settings)


async def test_mutual_tls_with_a_client_certificate(kafka, kafka_topics):
    await flows(kafka, secured(kafka, kafka_topics, bootstrap_servers=kafka.mtls, security_protocol="SSL",
                               ssl_cafile=str(kafka.certs["ca"]), ssl_certfile=str(kafka.certs["client_cert"]),
                               ssl_keyfile=str(kafka.certs["client_key"])))


async def _producer_start(settings: Settings) -> None:
    producer = AIOKafkaProducer(**settings.kafka_common(), request_timeout_ms=5000)
    try:
        await producer.start()
    finally:
        await producer.stop()


async def test_mutual_tls_without_a_client_certificate_is_refused(kafka, kafka_topics):
    settings = secured(kafka, kafka_topics, bootstrap_servers=kafka.mtls, security_protocol="SSL",
                       ssl_cafile=str(kafka.certs["ca"]))
    # The broker drops the handshake: aiokafka cannot bootstrap (not a time-out: well within 30 s).
    with pytest.raises(KafkaConnectionError, match="Unable to bootstrap"):
        await asyncio.wait_for(_producer_start(settings), 30)


async def test_wrong_scram_password_is_named_and_nothing_is_consumed(kafka, kafka_topics, caplog):
    """A bad credential: the broker's own reason (invalid credentials, the mechanism) is logged on every
    connection attempt, the worker stays not ready and consumes nothing (it retries with backoff, as for an
    unreachable broker: credentials may be fixed under it), and a stop ends it promptly."""
    await produce(kafka.bootstrap, kafka_topics["input"], lossless_images(4, seed=3)[0], 2)
    settings = secured(kafka, kafka_topics, **scram(kafka, password="not-the-password"))
    workers: list = []
    task = asyncio.create_task(serve(settings, worker_out=workers))
    deadline = asyncio.get_running_loop().time() + 60
    while "invalid credentials" not in caplog.text and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
    assert "SaslAuthenticationFailed" in caplog.text and "SCRAM-SHA-512" in caplog.text, caplog.text[-2000:]
    assert workers and workers[0].counts["consumed"] == 0
    workers[0].request_stop()
    assert await asyncio.wait_for(task, 30) == 0
    assert await read_all(kafka.bootstrap, kafka_topics["output"], 1, timeout_s=1) == []
