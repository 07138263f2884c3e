"""TrajectoryBatch: the one record that travels from sampler to reward server to learner.

B samples, T sampler steps. Samples of one prompt share a `group_ids` value; the K samples of a
group are the leave-one-out group. Tensors are on the CPU when the record crosses Ray. Optional
tensor fields (None when absent) are carried through select / to / concat like the others.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class TrajectoryBatch:
    prompts: list[str]  # [B] prompt text
    prompt_ids: torch.Tensor  # [B] long: index of the prompt in its source
    group_ids: torch.Tensor  # [B] long: samples of one prompt in one iteration share it
    seeds: torch.Tensor  # [B] long: the per-sample seed of x_T and the step noise (a group's first seed for shared noise)
    prompt_embeds: torch.Tensor  # [B, L, D] text-encoder states of the prompt
    # [B, T+1, C, H, W]: x_T ... x_0 (latents[:, j] is the input of step j); [B, 1, C, H, W] = x_0 alone in
    # the clean-only record of the forward-process objectives (PolicyBase.sample(clean_only=True))
    latents: torch.Tensor
    timesteps: torch.Tensor  # [B, T]: the scheduler timestep of step j
    log_probs: torch.Tensor  # [B, T] float32: logp_old of x_{j+1} given x_j under the behaviour policy; [B, 0] clean-only
    images: torch.Tensor  # [B, H, W, 3] uint8 decoded x_0
    version: int = 0  # policy version that sampled the batch
    rewards: torch.Tensor | None = None  # [B] float32, after scoring
    advantages: torch.Tensor | None = None  # [B] float32, after the advantage estimator
    sde_mask: torch.Tensor | None = None  # [B, T] bool: the stochastic steps (None: all); only they train
    # [B, L, D] text-encoder states of the empty prompt (two-pass CFG); None without it (FLUX.1-dev)
    negative_embeds: torch.Tensor | None = None
    pooled_embeds: torch.Tensor | None = None  # [B, P] pooled text embedding (SD3, FLUX); None for SD
    negative_pooled_embeds: torch.Tensor | None = None  # [B, P] the empty prompt's (SD3 with CFG)

    # the fields a policy's network is conditioned on (PolicyBase._conditioning / log_prob)
    CONDITIONING = ("prompt_embeds", "negative_embeds", "pooled_embeds", "negative_pooled_embeds")

    def conditioning(self) -> dict[str, torch.Tensor]:
        """The conditioning tensors of the batch, by field name (absent optional ones left out)."""
        return {name: getattr(self, name) for name in self.CONDITIONING if getattr(self, name) is not None}

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    def select(self, index: torch.Tensor | list[int] | slice) -> TrajectoryBatch:
        """The sub-batch of the given sample indices (or slice)."""
        if isinstance(index, slice):
            idx = torch.arange(len(self))[index]
        else:
            idx = torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value[idx]
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in idx.tolist()]
            else:
                out[f.name] = value
        return TrajectoryBatch(**out)

    def to(self, device: torch.device | str) -> TrajectoryBatch:
        return replace(
            self,
            **{f.name: getattr(self, f.name).to(device) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)},
        )

    @staticmethod
    def concat(batches: list[TrajectoryBatch]) -> TrajectoryBatch:
        """Concatenate along the sample axis; `version` becomes the oldest version present."""
        if not batches:
            raise ValueError("TrajectoryBatch.concat needs at least one batch")
        out = {}
        for f in fields(TrajectoryBatch):
            values = [getattr(b, f.name) for b in batches]
            if f.name == "version":
                out[f.name] = min(values)
            elif f.default is None:  # an optional field: kept only where every batch has it
                out[f.name] = None if any(v is None for v in values) else torch.cat(values)
            elif isinstance(values[0], list):
                out[f.name] = [x for v in values for x in v]
            else:
                out[f.name] = torch.cat(values)
        return TrajectoryBatch(**out)
