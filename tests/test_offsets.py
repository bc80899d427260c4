from worker.policy.offsets import OffsetTracker

P0, P1 = ("t", 0), ("t", 1)


def test_commits_only_contiguous_finished_prefix():
    t = OffsetTracker()
    for off in range(5):
        t.start(P0, off)
    assert t.to_commit() == {}
    t.finish(P0, 1)
    t.finish(P0, 2)
    assert t.committable(P0) == 0  # 0 still in flight
    t.finish(P0, 0)
    assert t.to_commit() == {P0: 3}  # 3 and 4 still in flight
    t.finish(P0, 4)
    assert t.to_commit() == {P0: 3}
    t.finish(P0, 3)
    assert t.to_commit() == {P0: 5}


def test_partitions_are_independent_and_out_of_order():
    t = OffsetTracker()
    t.start(P0, 10)
    t.start(P1, 7)
    t.start(P1, 8)
    t.finish(P1, 8)
    t.finish(P0, 10)
    assert t.to_commit() == {P0: 11}
    t.finish(P1, 7)
    assert t.to_commit() == {P0: 11, P1: 9}


def test_never_goes_backwards_and_reports_only_moves():
    t = OffsetTracker()
    t.start(P0, 5)
    t.finish(P0, 5)
    pos = t.to_commit()
    assert pos == {P0: 6}
    t.mark_committed(pos)
    assert t.to_commit() == {}
    # a re-delivered lower offset (seek back) must not pull the position back
    t.start(P0, 3)
    assert t.in_flight(P0) == 0
    assert t.to_commit() == {}
    t.mark_committed({P0: 4})
    t.start(P0, 6)
    assert t.to_commit() == {}  # 6 in flight: position stays 6, already committed


def test_in_flight_counts_and_forget():
    t = OffsetTracker()
    t.start(P0, 0)
    t.start(P0, 0)  # duplicate start is idempotent
    t.start(P1, 0)
    assert t.in_flight() == 2 and t.in_flight(P0) == 1
    t.forget(P0)
    assert t.in_flight() == 1
    t.finish(P0, 0)  # finishing work of a revoked partition is a no-op
    assert t.to_commit() == {}


def test_scope_filter():
    t = OffsetTracker()
    t.start(P0, 0)
    t.finish(P0, 0)
    t.start(P1, 0)
    t.finish(P1, 0)
    assert t.to_commit({P1}) == {P1: 1}


def test_span_counts_finished_entries_behind_a_stuck_offset():
    t = OffsetTracker()
    for off in range(10):
        t.start(P0, off)
    t.start(P1, 0)
    for off in range(10):
        if off != 2:
            t.finish(P0, off)
    # 0 and 1 are the committable prefix (not held); 3..9 wait behind 2
    assert t.span(P0) == 7 and t.span() == 7 and t.committable(P0) == 2
    t.finish(P1, 0)
    assert t.span(P1) == 0 and t.span() == 7
    t.start(P0, 10)
    t.finish(P0, 10)
    assert t.span() == 8  # grows with everything finished after the stuck one
    t.finish(P0, 2)
    assert t.span() == 0 and t.to_commit() == {P0: 11, P1: 1}
    t.forget(P0)
    assert t.span(P0) == 0


def test_oldest_unfinished_message_by_start_time():
    t = OffsetTracker()
    assert t.oldest() is None
    t.start(P0, 5, now=10.0)
    t.start(P1, 1, now=4.0)
    t.start(P0, 6, now=12.0)
    assert t.oldest() == (P1, 1, 4.0)
    t.finish(P1, 1)
    oldest = t.oldest()
    assert (oldest.partition, oldest.offset, oldest.started_at) == (P0, 5, 10.0)
    t.finish(P0, 5)
    t.finish(P0, 6)
    assert t.oldest() is None
