"""The driver's trajectory buffer: ObjectRefs of sampled batches, their rewards, and advantages.

The buffer holds references, never trajectories. Each entry is one sampler batch (an ObjectRef)
with the policy version that sampled it and, per sample, its group id and prompt; rewards arrive
per sample as reward actors finish. `take` hands out only complete groups (all K samples scored),
computes their advantages with the configured estimator (leave-one-out for LOOP), drops groups
older than the staleness limit, and returns a `LearnBatch`: per sample, where it lives (ref, row),
its reward and advantage. A group missing a sample (a failed sampler or reward call) is never used.
A scored sample whose reward is invalid (NaN or inf: the reward actor marks a misbehaving reward's
images so) rejects its whole group: never learned from, never given an advantage, and counted in
`rejected_groups`. "Not scored yet" is kept apart from "scored invalid" by a `scored` mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from loop_ray.algorithms import StatTracker, apply_control, compute_advantages, control_seed


@dataclass
class _Entry:
    ref: object  # ObjectRef of a TrajectoryBatch
    version: int
    group_ids: np.ndarray  # [B]
    prompts: list[str]  # [B]
    rewards: np.ndarray  # [B] float32; NaN until scored, and NaN where scored invalid
    used: np.ndarray  # [B] bool: handed out or dropped
    scored: np.ndarray  # [B] bool: a reward came back (valid or not)


@dataclass
class LearnBatch:
    """Samples for one learner phase, in group order: sample i is row `rows[i]` of `refs[i]`."""

    refs: list
    rows: np.ndarray  # [N] long
    versions: np.ndarray  # [N] long
    rewards: torch.Tensor  # [N] float32
    advantages: torch.Tensor  # [N] float32
    group_ids: np.ndarray  # [N]
    dropped_stale: int = 0
    rejected_groups: int = 0  # complete groups with an invalid reward, left out

    def __len__(self) -> int:
        return len(self.rows)

    def pieces(self, index) -> tuple[list[tuple[object, list[int]]], list[int]]:
        """The samples `index` grouped by batch: ([(ref, rows), ...], order), where `order` lists
        the samples in the order of the concatenated pieces' rows."""
        out: dict[int, tuple[object, list[int], list[int]]] = {}
        for i in list(index):
            ref = self.refs[i]
            piece = out.setdefault(id(ref), (ref, [], []))
            piece[1].append(int(self.rows[i]))
            piece[2].append(int(i))
        return [(ref, rows) for ref, rows, _ in out.values()], [i for _, _, idx in out.values() for i in idx]

    def shard(self, num_shards: int) -> list[dict]:
        """Equal consecutive shards for the learner's data-parallel workers: each shard is
        {"pieces": [(ref, rows)], "advantages": Tensor, "rewards": Tensor}, advantages and rewards
        in the order of the concatenated pieces' rows."""
        n = len(self) // num_shards
        shards = []
        for w in range(num_shards):
            pieces, order = self.pieces(range(w * n, (w + 1) * n))
            shards.append({"pieces": pieces, "advantages": self.advantages[order], "rewards": self.rewards[order]})
        return shards

    def truncate(self, n: int) -> LearnBatch:
        """The first n samples (groups stay whole where n allows; advantages are already fixed)."""
        return LearnBatch(
            self.refs[:n], self.rows[:n], self.versions[:n], self.rewards[:n], self.advantages[:n],
            self.group_ids[:n], self.dropped_stale, self.rejected_groups,
        )


@dataclass
class TrajectoryBuffer:
    k: int
    estimator: str
    std_eps: float = 1e-6
    stat_tracker: StatTracker | None = None
    control: str = "none"  # algorithm.control: "shuffle" permutes each taken batch's advantages
    seed: int = 0  # the run's seed, for the control's permutation
    _entries: dict[int, _Entry] = field(default_factory=dict)
    _next: int = 0

    def add(self, ref, version: int, group_ids, prompts: list[str]) -> int:
        """Register a sampler batch; returns its entry id (for `set_rewards`)."""
        group_ids = np.asarray(group_ids).reshape(-1)
        if len(group_ids) != len(prompts):
            raise ValueError(f"buffer.add: {len(group_ids)} group ids for {len(prompts)} prompts")
        entry_id = self._next
        self._next += 1
        self._entries[entry_id] = _Entry(
            ref, version, group_ids, list(prompts), np.full(len(prompts), np.nan, np.float32),
            np.zeros(len(prompts), bool), np.zeros(len(prompts), bool),
        )
        return entry_id

    def set_rewards(self, entry_id: int, start: int, rewards) -> None:
        """Rewards of samples start, start+1, ... of an entry; these samples count as scored, and a
        NaN or inf among them as scored invalid (its group is rejected)."""
        rewards = np.asarray(rewards, dtype=np.float32).reshape(-1)
        entry = self._entries[entry_id]
        entry.rewards[start : start + len(rewards)] = np.where(np.isfinite(rewards), rewards, np.nan)
        entry.scored[start : start + len(rewards)] = True

    def __len__(self) -> int:
        return sum(int((~e.used).sum()) for e in self._entries.values())

    def _groups(self) -> dict[int, list[tuple[int, int]]]:
        groups: dict[int, list[tuple[int, int]]] = {}
        for eid, e in self._entries.items():
            for row, g in enumerate(e.group_ids.tolist()):
                if not e.used[row]:
                    groups.setdefault(g, []).append((eid, row))
        return groups

    def complete_groups(self) -> list[int]:
        """Group ids with exactly K samples, all scored (valid or not), in order of first appearance."""
        out = []
        for g, members in self._groups().items():
            if len(members) == self.k and all(self._entries[e].scored[r] for e, r in members):
                out.append(g)
        return out

    def _invalid(self, members: list[tuple[int, int]]) -> bool:
        return any(np.isnan(self._entries[e].rewards[r]) for e, r in members)

    def take(self, current_version: int, max_staleness: int, max_groups: int | None = None) -> LearnBatch:
        """Remove and return complete groups (at most `max_groups`), with advantages.

        Complete groups with an invalid reward are rejected (forgotten, counted in
        `rejected_groups`); groups sampled more than `max_staleness` versions before
        `current_version` are dropped (counted in `dropped_stale`). Incomplete groups stay in the
        buffer; `clear` forgets them.
        """
        groups = self._groups()
        ready, stale, rejected = [], 0, 0
        for g in self.complete_groups():
            version = min(self._entries[e].version for e, _ in groups[g])
            if self._invalid(groups[g]):
                rejected += 1
                self._forget(groups[g])
            elif current_version - version > max_staleness:
                stale += 1
                self._forget(groups[g])
            else:
                ready.append(g)
        ready.sort()  # group-id order, whatever order the calls finished in (a resent call finishes late)
        ready = ready[:max_groups] if max_groups is not None else ready
        members = [groups[g] for g in ready]
        if not members:
            return LearnBatch(
                [], np.zeros(0, int), np.zeros(0, int), torch.zeros(0), torch.zeros(0), np.zeros(0, int), stale, rejected
            )
        rewards = torch.tensor([[self._entries[e].rewards[r] for e, r in m] for m in members])  # [G, K]
        prompts = [self._entries[m[0][0]].prompts[m[0][1]] for m in members]
        advantages = compute_advantages(
            rewards, self.estimator, std_eps=self.std_eps, stat_tracker=self.stat_tracker, prompts=prompts
        )
        generator = torch.Generator().manual_seed(control_seed(self.seed, current_version))
        advantages = apply_control(advantages, self.control, generator)
        flat = [(e, r) for m in members for e, r in m]
        batch = LearnBatch(
            refs=[self._entries[e].ref for e, _ in flat],
            rows=np.array([r for _, r in flat], dtype=int),
            versions=np.array([self._entries[e].version for e, _ in flat], dtype=int),
            rewards=rewards.flatten(),
            advantages=advantages.flatten().to(torch.float32),
            group_ids=np.repeat(np.array(ready), self.k),
            dropped_stale=stale,
            rejected_groups=rejected,
        )
        for m in members:
            self._forget(m)
        return batch

    def _forget(self, members: list[tuple[int, int]]) -> None:
        for e, r in members:
            self._entries[e].used[r] = True
        for eid in [e for e, entry in self._entries.items() if entry.used.all()]:
            del self._entries[eid]

    def clear(self) -> int:
        """Forget everything still held (incomplete groups at the end of a synchronous iteration);
        returns the number of samples forgotten."""
        n = len(self)
        self._entries.clear()
        return n
