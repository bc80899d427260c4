"""The micro-batching policy on a fake clock: no sleeps, no timing assertions."""

from worker.policy.batching import MicroBatcher
from worker.intake.consume import Backpressure


def test_single_item_waits_at_most_max_wait():
    b = MicroBatcher(max_batch_size=8, max_wait_s=0.25)
    b.add("a", now=100.0)
    assert not b.ready(100.0)
    assert b.time_left(100.0) == 0.25
    assert not b.ready(100.125)
    assert b.ready(100.25)
    assert b.time_left(100.5) == 0.0
    assert [i for i, _ in b.take()] == ["a"]
    assert b.deadline() is None and b.time_left(200.0) is None


def test_full_batch_is_ready_at_once_and_keeps_order():
    b = MicroBatcher(max_batch_size=3, max_wait_s=10.0)
    for i in range(5):
        b.add(i, now=float(i) * 1e-6)
    assert b.ready(0.0)
    assert b.time_left(0.0) == 0.0
    assert [i for i, _ in b.take()] == [0, 1, 2]
    # leftovers keep their own arrival time: the deadline is the oldest leftover's
    assert b.deadline() == 3e-6 + 10.0
    assert [i for i, _ in b.take()] == [3, 4]


def test_deadline_follows_oldest_item():
    b = MicroBatcher(max_batch_size=4, max_wait_s=1.0)
    b.add("x", now=0.0)
    b.add("y", now=0.9)
    assert b.ready(1.0)  # x has waited 1.0 even though y only 0.1


def test_zero_wait_sends_immediately():
    b = MicroBatcher(max_batch_size=4, max_wait_s=0.0)
    b.add("x", now=5.0)
    assert b.ready(5.0)


def test_with_kinds_a_full_batch_holds_one_kind_and_the_deadline_still_mixes():
    kind = str.isupper  # "A".."Z": one kind (card JPEGs, say), "a".."z" the other (decoded rows)
    b = MicroBatcher(max_batch_size=3, max_wait_s=1.0, kind=kind)
    for t, item in enumerate(["a", "B", "c", "D"]):
        b.add(item, now=t * 0.1)
    assert len(b) == 4 and not b.full()  # more than a batch waiting, but neither kind fills one
    assert not b.ready(0.3) and b.time_left(0.5) == 0.5  # the oldest ("a") sets the deadline
    b.add("F", now=0.4)
    assert b.full() and b.ready(0.4) and b.time_left(0.4) == 0.0
    assert [i for i, _ in b.take()] == ["B", "D", "F"]  # the full kind alone, oldest first
    assert [i for i, _ in b._items] == ["a", "c"] and not b.full()
    assert not b.ready(0.9) and b.ready(1.0)  # "a" still waits only max_wait from its own arrival
    b.add("G", now=1.0)
    assert [i for i, _ in b.take()] == ["a", "c", "G"]  # closed by the deadline: the oldest items, mixed
    assert len(b) == 0 and not b.full() and b.deadline() is None


def test_with_kinds_the_kind_whose_oldest_came_first_goes_first():
    b = MicroBatcher(max_batch_size=2, max_wait_s=1.0, kind=str.isupper)
    for t, item in enumerate(["a", "B", "b", "C"]):
        b.add(item, now=float(t))
    assert [i for i, _ in b.take()] == ["a", "b"]
    assert [i for i, _ in b.take()] == ["B", "C"]


def test_without_kinds_a_full_batch_is_the_oldest_items():
    b = MicroBatcher(max_batch_size=3, max_wait_s=1.0)
    for t, item in enumerate(["a", "B", "c", "D"]):
        b.add(item, now=float(t))
    assert b.full() and [i for i, _ in b.take()] == ["a", "B", "c"]


def test_backpressure_hysteresis():
    bp = Backpressure(high=10, low=5)
    assert bp.update(9) is None and bp.room(9) == 1
    assert bp.update(10) == "pause"
    assert bp.update(7) is None and bp.paused
    assert bp.update(5) == "resume"
    assert bp.update(6) is None and not bp.paused
