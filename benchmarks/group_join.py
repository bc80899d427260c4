"""How long a fresh consumer group of K members takes to hand every member its partitions (a broker
experiment, no worker): why one intake in some runs started about 1 s after the others (runs 22-24).

K consumers (threads of this process, each its own client) subscribe to a fresh topic of 2K partitions
together and keep polling until all have an assignment; printed per run: each member's seconds from the
subscription to its assignment. On the embedded tansu every member waits out its join delay (~3 s); with
librdkafka a member is often assigned exactly 1 s after the others: a follower whose SyncGroup reaches
tansu before the leader's (which carries the assignments) is answered on tansu's next retry, about 1 s
later, not when the leader's arrives, as Apache Kafka does. librdkafka's followers send it within a
millisecond or two of their JoinGroup response, so they often beat the leader; aiokafka's rarely do.
``--debug cgrp`` writes librdkafka's group log to ``--log`` to see the order.

``python -m benchmarks.group_join --client librdkafka --members 7 --runs 8`` (a local tansu unless
``--bootstrap``). Results: docs/benchmarks.md, run 24.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
import uuid

from worker.broker import LocalBroker, create_topics


def _librdkafka_member(bootstrap: str, topic: str, group: str, i: int, t0: float, got: dict, members: int,
                       debug: str, deadline_s: float) -> None:
    from confluent_kafka import Consumer

    conf = {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
            "session.timeout.ms": 6000, "partition.assignment.strategy": "roundrobin"}
    if debug:
        conf.update({"debug": debug, "logger": logging.getLogger(f"member-{i}")})
    consumer = Consumer(conf)

    def on_assign(_consumer, partitions) -> None:
        got[i] = (round(time.monotonic() - t0, 3), len(partitions))

    consumer.subscribe([topic], on_assign=on_assign)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and len(got) < members:  # every member polls until all are assigned
        consumer.poll(0.05)
    consumer.close()


def _aiokafka_member(bootstrap: str, topic: str, group: str, i: int, t0: float, got: dict, members: int,
                     debug: str, deadline_s: float) -> None:
    from aiokafka import AIOKafkaConsumer

    async def run() -> None:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                    session_timeout_ms=6000)
        await consumer.start()
        try:
            end = time.monotonic() + deadline_s
            while time.monotonic() < end and len(got) < members:
                if i not in got and consumer.assignment():
                    got[i] = (round(time.monotonic() - t0, 3), len(consumer.assignment()))
                await consumer.getmany(timeout_ms=20)
        finally:
            await consumer.stop()

    asyncio.run(run())


MEMBERS = {"librdkafka": _librdkafka_member, "aiokafka": _aiokafka_member}


def one_run(bootstrap: str, client: str, members: int, debug: str = "", deadline_s: float = 15.0) -> list[float]:
    """Seconds from the subscription to each member's assignment, sorted; a member never assigned is left out."""
    topic, group = f"join-{uuid.uuid4().hex[:8]}", f"join-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(bootstrap, [(topic, 2 * members)]))
    got: dict[int, tuple[float, int]] = {}
    t0 = time.monotonic()
    threads = [threading.Thread(target=MEMBERS[client], args=(bootstrap, topic, group, i, t0, got, members, debug,
                                                               deadline_s)) for i in range(members)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(seconds for seconds, _ in got.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--client", choices=sorted(MEMBERS), default="librdkafka")
    p.add_argument("--members", type=int, default=7)
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--bootstrap", default="", help="A broker to use instead of a local tansu.")
    p.add_argument("--debug", default="", help="librdkafka debug contexts (e.g. cgrp), logged to --log.")
    p.add_argument("--log", default="group_join.log")
    args = p.parse_args()
    if args.debug:
        logging.basicConfig(filename=args.log, level=logging.DEBUG, format="%(relativeCreated)d %(name)s %(message)s")
    broker = None if args.bootstrap else LocalBroker().start()
    bootstrap = args.bootstrap or broker.bootstrap
    try:
        late = 0
        for run in range(args.runs):
            times = one_run(bootstrap, args.client, args.members, args.debug)
            spread = times[-1] - times[0] if times else float("nan")
            late += spread > 0.5 or len(times) < args.members
            print(f"run {run}: {len(times)}/{args.members} assigned, seconds {times}, spread {spread:.3f}", flush=True)
        print(f"{args.client}, {args.members} members: a member assigned > 0.5 s after the first in {late} of "
              f"{args.runs} runs")
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
