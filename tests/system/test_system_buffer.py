"""The trajectory buffer: driver-side bookkeeping of ObjectRefs, complete groups, advantages."""

import numpy as np
import torch

from loop_ray.system.roles.buffer import TrajectoryBuffer


class Ref:  # stands in for an ObjectRef: the buffer only stores and hands references back
    def __init__(self, name):
        self.name = name


def _fill(buf, ref, version, groups, k, rewards):
    entry = buf.add(ref, version, np.repeat(groups, k), [f"p{g}" for g in groups for _ in range(k)])
    buf.set_rewards(entry, 0, rewards)
    return entry


def test_complete_groups_get_leave_one_out_advantages():
    buf = TrajectoryBuffer(k=4, estimator="leave_one_out")
    a, b = Ref("a"), Ref("b")
    _fill(buf, a, 0, [0], 4, [0.0, 1.0, 2.0, 5.0])
    _fill(buf, b, 0, [1], 4, [1.0, 1.0, 1.0, 1.0])
    batch = buf.take(current_version=0, max_staleness=0)
    assert len(batch) == 8 and len(buf) == 0
    torch.testing.assert_close(batch.advantages[:4], torch.tensor([-8 / 3, 1 - 7 / 3, 0.0, 4.0]))
    torch.testing.assert_close(batch.advantages[4:], torch.zeros(4))
    assert [r.name for r in batch.refs] == ["a"] * 4 + ["b"] * 4
    assert batch.rows.tolist() == [0, 1, 2, 3] * 2


def test_incomplete_group_is_never_used():
    buf = TrajectoryBuffer(k=2, estimator="leave_one_out")
    ref = Ref("x")
    entry = buf.add(ref, 0, [0, 0, 1, 1], ["p0", "p0", "p1", "p1"])
    buf.set_rewards(entry, 0, [1.0, 2.0, 3.0])  # the last sample of group 1 was never scored
    batch = buf.take(0, 0)
    assert batch.group_ids.tolist() == [0, 0]
    torch.testing.assert_close(batch.advantages, torch.tensor([-1.0, 1.0]))
    assert buf.clear() == 2  # group 1 stays out, and is forgotten
    assert len(buf.take(0, 0)) == 0


def test_group_split_over_two_batches_completes_only_when_both_scored():
    buf = TrajectoryBuffer(k=2, estimator="leave_one_out")
    e1 = buf.add(Ref("s0"), 0, [7], ["p"])
    buf.set_rewards(e1, 0, [1.0])
    assert buf.complete_groups() == []
    e2 = buf.add(Ref("s1"), 0, [7], ["p"])
    buf.set_rewards(e2, 0, [3.0])
    batch = buf.take(0, 0)
    assert [r.name for r in batch.refs] == ["s0", "s1"]
    torch.testing.assert_close(batch.advantages, torch.tensor([-2.0, 2.0]))


def test_stale_groups_are_dropped():
    buf = TrajectoryBuffer(k=2, estimator="leave_one_out")
    _fill(buf, Ref("old"), 0, [0], 2, [0.0, 1.0])
    _fill(buf, Ref("new"), 2, [1], 2, [0.0, 1.0])
    batch = buf.take(current_version=2, max_staleness=1)
    assert batch.dropped_stale == 1
    assert [r.name for r in batch.refs] == ["new", "new"]


def test_stat_tracker_estimator_uses_the_tracker():
    from loop_ray.algorithms import StatTracker

    tracker = StatTracker(buffer_size=4, min_count=1)
    buf = TrajectoryBuffer(k=1, estimator="stat_tracker", stat_tracker=tracker)
    _fill(buf, Ref("a"), 0, [0, 1], 1, [1.0, 3.0])
    buf.take(0, 0)
    assert set(tracker.history) == {"p0", "p1"}


def test_shards_are_equal_and_keep_rows_and_advantages_aligned():
    buf = TrajectoryBuffer(k=2, estimator="none")
    a, b = Ref("a"), Ref("b")
    _fill(buf, a, 0, [0, 1], 2, [0.0, 1.0, 2.0, 3.0])
    _fill(buf, b, 0, [2, 3], 2, [4.0, 5.0, 6.0, 7.0])
    shards = buf.take(0, 0).shard(2)
    assert [[(r.name, rows) for r, rows in s["pieces"]] for s in shards] == [[("a", [0, 1, 2, 3])], [("b", [0, 1, 2, 3])]]
    torch.testing.assert_close(shards[1]["advantages"], torch.tensor([4.0, 5.0, 6.0, 7.0]))


def test_group_with_an_invalid_reward_is_rejected_whole_and_counted():
    buf = TrajectoryBuffer(k=2, estimator="leave_one_out")
    ref = Ref("x")
    entry = buf.add(ref, 0, [0, 0, 1, 1, 2, 2, 3, 3], [f"p{g}" for g in (0, 0, 1, 1, 2, 2, 3, 3)])
    buf.set_rewards(entry, 0, [1.0, np.nan, 2.0, 4.0, np.inf, 0.0, 5.0, -np.inf])
    assert buf.complete_groups() == [0, 1, 2, 3]  # scored, valid or not: none is waiting any more
    batch = buf.take(0, 0)
    assert batch.rejected_groups == 3 and batch.dropped_stale == 0
    assert batch.group_ids.tolist() == [1, 1] and batch.rows.tolist() == [2, 3]
    torch.testing.assert_close(batch.advantages, torch.tensor([-2.0, 2.0]))  # the rest's advantages only
    assert torch.isfinite(batch.rewards).all()
    assert len(buf) == 0 and buf.clear() == 0  # rejected groups are forgotten, not left incomplete
    assert buf.take(0, 0).rejected_groups == 0  # counted once


def test_not_scored_yet_is_not_scored_invalid():
    buf = TrajectoryBuffer(k=2, estimator="leave_one_out")
    entry = buf.add(Ref("x"), 0, [0, 0, 1, 1], ["p0", "p0", "p1", "p1"])
    buf.set_rewards(entry, 0, [np.nan])  # sample 0 scored invalid, sample 1 not scored yet
    buf.set_rewards(entry, 2, [1.0, 3.0])
    batch = buf.take(0, 0)
    assert batch.rejected_groups == 0 and batch.group_ids.tolist() == [1, 1]  # group 0 still waits
    buf.set_rewards(entry, 1, [2.0])  # its other sample comes back valid: the group is still rejected
    batch = buf.take(0, 0)
    assert batch.rejected_groups == 1 and len(batch) == 0 and len(buf) == 0


def test_all_groups_rejected_gives_an_empty_batch_that_says_so():
    buf = TrajectoryBuffer(k=2, estimator="leave_one_out")
    _fill(buf, Ref("a"), 0, [0, 1], 2, [np.nan, 1.0, 1.0, np.inf])
    batch = buf.take(0, 0)
    assert len(batch) == 0 and batch.rejected_groups == 2
    assert batch.truncate(0).rejected_groups == 2
