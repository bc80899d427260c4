"""The bench collector's hole tracking (benchmarks/gaps.py), pure."""

from benchmarks.gaps import Gaps


def test_in_order_offsets_leave_no_hole_and_no_seek():
    g = Gaps(wait_s=0.05)
    assert all(g.take("p", o) for o in range(10))
    assert g.seeks(0.0) == [] and g.seeks(1.0) == []
    assert g.filled == 0


def test_a_hole_is_sought_after_the_wait_then_filled():
    g = Gaps(wait_s=0.05)
    for o in (0, 1, 5, 6):  # 2..4 not served yet
        g.take("p", o)
    assert g.seeks(10.0) == []  # noticed now
    assert g.seeks(10.01) == []  # not long enough
    assert g.seeks(10.06) == [("p", 2)]
    assert not g.take("p", 5)  # the re-read after the seek: already taken
    for o in (2, 3, 4):
        assert g.take("p", o)
    assert g.filled == 3
    assert g.seeks(20.0) == []


def test_a_hole_the_broker_really_has_is_given_up_after_max_tries():
    g = Gaps(wait_s=0.0, max_tries=3)
    for o in (0, 2, 3):  # offset 1 never comes (e.g. a transaction marker)
        g.take("p", o)
    sought = [g.seeks(float(t)) for t in range(6)]
    assert sought[0] == [] and sought[1:4] == [[("p", 1)]] * 3
    assert sought[4] == [] and g.given_up == 1
    assert g.take("p", 4) and g.seeks(100.0) == []


def test_partitions_are_independent():
    g = Gaps(wait_s=0.0)
    g.take("a", 0)
    g.take("a", 2)
    g.take("b", 0)
    g.take("b", 1)
    g.seeks(0.0)
    assert g.seeks(1.0) == [("a", 1)]
