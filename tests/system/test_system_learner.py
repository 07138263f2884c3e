"""The learner group on a fixed batch: real Ray actors, a real DeepSpeed engine on the CPU (gloo)."""

import numpy as np
import pytest
import torch

from loop_ray.config import load_config
from loop_ray.system.roles.buffer import TrajectoryBuffer
from loop_ray.system.roles.learner import LearnerGroup

pytestmark = pytest.mark.slow


def _cfg(**overrides):
    base = {"learner.num_cpus_per_worker": 0.5, "algorithm.inner_epochs": 1, "learner.lr": 1e-3}
    return load_config("configs/debug.yaml", {**base, **overrides})


@pytest.fixture(scope="module")
def fixed_batch(ray_session):
    """8 trajectories (2 prompts x K=4) of the initial tiny_sd policy in the object store, with
    leave-one-out advantages of a reward that prefers bright images."""
    from loop_ray.diffusion.factory import build_policy

    torch.set_num_threads(1)
    cfg = _cfg()
    policy = build_policy(cfg)
    batch = policy.sample(["a red circle", "a blue square"], 4, list(range(8)), group_ids=[0, 1])
    buf = TrajectoryBuffer(k=4, estimator="leave_one_out")
    entry = buf.add(ray_session.put(batch), 0, batch.group_ids.numpy(), batch.prompts)
    buf.set_rewards(entry, 0, batch.images.float().mean(dim=(1, 2, 3)).numpy() / 255.0)
    learn = buf.take(0, 0)
    assert len(learn) == 8 and learn.advantages.abs().sum() > 0
    return learn


def _run(cfg, learn, calls):
    """`calls` learner phases on the same samples with the same shuffles and timesteps (the
    iteration number fixes them), so the phases' losses are comparable."""
    group = LearnerGroup(cfg)
    try:
        digests = [group.digests()[0]]
        metrics = []
        for _ in range(calls):
            metrics.append(group.train(learn.shard(cfg.learner.num_workers), iteration=0))
            digests.append(group.digests()[0])
        return metrics, digests
    finally:
        group.shutdown()


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_learner_lowers_the_loss_and_moves_the_weights(fixed_batch, zero_stage):
    cfg = _cfg(**{"learner.zero_stage": zero_stage, "algorithm.clip_eps": 10.0})
    metrics, digests = _run(cfg, fixed_batch, calls=4)
    losses = [m[0]["loss"] for m in metrics]
    assert losses[-1] < losses[0] - 1e-4, losses
    assert len(set(digests)) == len(digests)  # every phase changed the weights
    first = metrics[0][0]
    assert first["optimizer_steps"] == 2 and np.isfinite(first["grad_norm"]) and first["grad_norm"] > 0
    # the samples came from these very weights: before the first update the ratio is 1
    assert first["first_ratio_max_abs_dev"] <= 1e-5
    assert metrics[1][0]["first_ratio_max_abs_dev"] > 1e-5  # ... and not once they have moved


def test_tiny_clip_range_clips_after_the_first_step_and_bounds_the_ratio(fixed_batch):
    settings = {"learner.lr": 1e-4, "algorithm.skip_last_steps": 1}
    wide, _ = _run(_cfg(**settings, **{"algorithm.clip_eps": 10.0}), fixed_batch, calls=3)
    tiny, _ = _run(_cfg(**settings, **{"algorithm.clip_eps": 1e-6}), fixed_batch, calls=3)
    wide, tiny = [m[0] for m in wide], [m[0] for m in tiny]
    assert tiny[0]["first_ratio_max_abs_dev"] <= 1e-5
    # one Adam step moves every ratio out of [1 - 1e-6, 1 + 1e-6], in the direction the advantage
    # favours, where the clipped objective is flat: no gradient is left
    assert all(m["last_clip_fraction"] == 1.0 for m in tiny)
    assert all(t["grad_norm"] < 0.1 * w["grad_norm"] for t, w in zip(tiny[1:], wide[1:]))

    def spread(runs):
        return max(max(m["ratio_max"] - 1, 1 - m["ratio_min"]) for m in runs)

    # only the optimizer's momentum moves the clipped policy further; the unclipped one keeps going
    assert spread(tiny) < 0.8 * spread(wide)


def test_published_weights_reach_a_sampler(fixed_batch, ray_session):
    from loop_ray.system.roles.sampler import RemoteSampler

    cfg = _cfg()
    group = LearnerGroup(cfg)
    sampler = RemoteSampler.options(num_cpus=0.25).remote(cfg.model_dump(mode="json"))
    try:
        group.train(fixed_batch.shard(1), iteration=0)
        handle = group.publish(1)
        assert handle.version == 1 and handle.num_bytes > 0
        learner_digest = group.digests()[0]
        assert ray_session.get(sampler.weights_digest.remote()) != learner_digest
        # a sampler asked for version 1 without its weights refuses; with them it loads them first
        with pytest.raises(ray_session.exceptions.RayTaskError, match="version 1"):
            ray_session.get(sampler.generate_images.options(num_returns=2).remote(["a red circle"], [0], 1, 1, None, 1)[0])
        stats, chunk = ray_session.get(
            sampler.generate_images.options(num_returns=2).remote(["a red circle"], [0], 1, 1, handle, 1)
        )
        assert stats["version"] == 1 and stats["weight_load_seconds"] > 0 and chunk["images"].shape[0] == 1
        assert ray_session.get(sampler.weights_digest.remote()) == learner_digest
    finally:
        group.shutdown()
        ray_session.kill(sampler)
