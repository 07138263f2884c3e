"""TrajectoryBatch: selection and concatenation keep every field aligned."""

import torch

from loop_ray.trajectory import TrajectoryBatch


def _batch(n, version, offset=0):
    T = 3
    return TrajectoryBatch(
        prompts=[f"p{i + offset}" for i in range(n)],
        prompt_ids=torch.arange(n) + offset,
        group_ids=(torch.arange(n) + offset) // 2,
        seeds=torch.arange(n) + 100 + offset,
        prompt_embeds=torch.randn(n, 4, 8),
        negative_embeds=torch.randn(n, 4, 8),
        latents=torch.randn(n, T + 1, 2, 4, 4),
        timesteps=torch.tensor([[900, 500, 100]] * n),
        log_probs=torch.randn(n, T),
        images=torch.randint(0, 255, (n, 4, 4, 3), dtype=torch.uint8),
        version=version,
    )


def test_select_and_concat():
    a, b = _batch(4, version=3), _batch(2, version=2, offset=4)
    both = TrajectoryBatch.concat([a, b])
    assert len(both) == 6 and both.version == 2 and both.num_steps == 3
    assert both.prompts[4] == "p4" and both.rewards is None
    sub = both.select([5, 0])
    assert sub.prompts == ["p5", "p0"]
    torch.testing.assert_close(sub.latents[1], a.latents[0])
    torch.testing.assert_close(sub.seeds, torch.tensor([105, 100]))
    assert len(both.select(slice(1, 3))) == 2
    a.rewards, b.rewards = torch.ones(4), torch.zeros(2)
    torch.testing.assert_close(TrajectoryBatch.concat([a, b]).rewards, torch.tensor([1.0] * 4 + [0.0] * 2))


def test_optional_conditioning_fields_travel_with_the_batch():
    """pooled_embeds (SD3, FLUX) go through select / concat / to; a batch without negative_embeds
    (FLUX.1-dev: no two-pass CFG) keeps None and leaves it out of its conditioning."""
    a, b = _batch(4, version=1), _batch(2, version=1, offset=4)
    a.pooled_embeds, b.pooled_embeds = torch.randn(4, 6), torch.randn(2, 6)
    both = TrajectoryBatch.concat([a, b])
    torch.testing.assert_close(both.select([4, 1]).pooled_embeds, torch.stack([b.pooled_embeds[0], a.pooled_embeds[1]]))
    assert both.to("cpu").pooled_embeds.shape == (6, 6) and both.negative_pooled_embeds is None
    assert set(both.conditioning()) == {"prompt_embeds", "negative_embeds", "pooled_embeds"}
    a.negative_embeds = b.negative_embeds = None
    flux_like = TrajectoryBatch.concat([a, b])
    assert flux_like.negative_embeds is None and set(flux_like.conditioning()) == {"prompt_embeds", "pooled_embeds"}
    assert flux_like.select([0]).negative_embeds is None
