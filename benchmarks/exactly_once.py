"""The throughput cost of processing_guarantee=exactly-once against at-least-once, on Apache Kafka.

    python -m benchmarks.exactly_once [--count 5000] [--rounds 2] [--bootstrap HOST:PORT]

Without ``--bootstrap`` it starts Apache Kafka itself, as the Kafka test tier does (tests/kafka_broker.py:
Maven Central, cached; needs java, mvn, openssl). Each run: fresh topics (4 input partitions), ``count``
64x64 PNGs preloaded, then ``python -m worker run`` (the bundled demo pipeline on the CPU, the CLI's
defaults otherwise) until the group's committed offsets cover every input. images/s is measured between
10% and 100% committed (so model loading and the group join are left out); commit cycles are the
intakes' ``worker_commits_total`` (an offset commit, or with exactly-once one transaction). The
guarantees alternate round by round, so drift on a shared machine hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from worker.broker import create_topics, free_port
from worker.samples import encode, synth_image

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4


def images(count: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    blobs = [encode(synth_image(rng, 64, 64, 3), "png") for _ in range(64)]
    return [blobs[i % len(blobs)] for i in range(count)]


async def preload(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        batch = [await producer.send(topic, v, partition=i % PARTITIONS) for i, v in enumerate(values)]
        await asyncio.gather(*batch)
    finally:
        await producer.stop()


async def committed(consumer: AIOKafkaConsumer, topic: str) -> int:
    return sum([await consumer.committed(TopicPartition(topic, p)) or 0 for p in range(PARTITIONS)])


def scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


async def one_run(bootstrap: str, guarantee: str, values: list[bytes], extra_env: dict[str, str]) -> dict:
    tag = uuid.uuid4().hex[:8]
    topics = {"input": f"bench-in-{tag}", "output": f"bench-out-{tag}", "dlq": f"bench-dlq-{tag}"}
    await create_topics(bootstrap, [(topics["input"], PARTITIONS), (topics["output"], PARTITIONS), (topics["dlq"], 1)])
    await preload(bootstrap, topics["input"], values)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env.update({"WORKER_BOOTSTRAP_SERVERS": bootstrap, "WORKER_INPUT_TOPIC": topics["input"],
                "WORKER_OUTPUT_TOPIC": topics["output"], "WORKER_DLQ_TOPIC": topics["dlq"],
                "WORKER_GROUP_ID": f"bench-{tag}", "WORKER_DEVICE": "cpu", "WORKER_HTTP_PORT": str(port),
                "WORKER_PROCESSING_GUARANTEE": guarantee, "WORKER_LOG_FORMAT": "json",
                "WORKER_LOG_LEVEL": "warning", "WORKER_SESSION_TIMEOUT_MS": "6000",
                "PYTHONPATH": str(ROOT), **extra_env})
    log = tempfile.NamedTemporaryFile(prefix=f"bench-{guarantee}-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "worker", "run"], env=env, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    n = len(values)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=f"bench-{tag}", enable_auto_commit=False)
    await consumer.start()
    try:
        t10 = None
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}; log {log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not done within 600 s; log {log.name}")
            done = await committed(consumer, topics["input"])
            now = time.monotonic()
            if t10 is None and done >= n // 10:
                t10, at10 = now, done
            if done >= n:
                t100 = now
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # the intakes write their metrics every 2 s
        cycles = scrape(port, "worker_commits_total")
    finally:
        await consumer.stop()
        proc.terminate()
        proc.wait(60)
        log.close()
    rate = (n - at10) / (t100 - t10)
    return {"guarantee": guarantee, "images": n, "seconds": t100 - t10, "rate": rate, "cycles": int(cycles),
            "exit": proc.returncode}


async def main_async(args: argparse.Namespace, bootstrap: str) -> None:
    extra = {}
    if args.intakes:
        extra["WORKER_INTAKE_PROCESSES"] = str(args.intakes)
    values = images(args.count)
    rows = []
    for r in range(args.rounds):
        order = ("at-least-once", "exactly-once") if r % 2 == 0 else ("exactly-once", "at-least-once")
        for guarantee in order:
            row = await one_run(bootstrap, guarantee, values, extra)
            row["round"] = r + 1
            rows.append(row)
            print(f"  round {r + 1} {guarantee}: {row['rate']:.0f} images/s, {row['cycles']} commit cycles, "
                  f"exit {row['exit']}", flush=True)
    print(f"\n{platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d %H:%M %Z')}, "
          f"{args.count} 64x64 PNGs, demo pipeline on the CPU\n")
    print("| guarantee | round | images/s (10%->100% committed) | commit cycles | images per cycle |")
    print("| --- | --- | ---: | ---: | ---: |")
    for row in rows:
        per = row["images"] / row["cycles"] if row["cycles"] else float("nan")
        print(f"| {row['guarantee']} | {row['round']} | {row['rate']:,.0f} | {row['cycles']} | {per:,.0f} |")
    for g in ("at-least-once", "exactly-once"):
        rates = [r["rate"] for r in rows if r["guarantee"] == g]
        print(f"| **{g}, mean** | | {sum(rates) / len(rates):,.0f} | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--intakes", type=int, default=0, help="WORKER_INTAKE_PROCESSES (0: the worker's default)")
    parser.add_argument("--bootstrap", default="", help="an existing Kafka cluster (else Apache Kafka is started)")
    args = parser.parse_args()
    if args.bootstrap:
        asyncio.run(main_async(args, args.bootstrap))
        return
    sys.path.insert(0, str(ROOT))
    from tests.kafka_broker import KafkaBroker

    with KafkaBroker() as broker:
        print(f"Apache Kafka {broker.version} on {broker.bootstrap}", flush=True)
        asyncio.run(main_async(args, broker.bootstrap))


if __name__ == "__main__":
    main()
