"""TorchEngine: the part of DeepSpeed's engine API that `update_on_shard` uses, over plain torch.

For single-process runs where DeepSpeed is absent or pointless (the study on one GPU, the
benchmarks' no-Ray baseline): the learner's optimizer (`build_optimizer`: AdamW or SGD), gradient accumulation over
`grad_accum_steps` micro-steps (each loss divided by it, as DeepSpeed does), and clipping of the
global gradient norm to `learner.max_grad_norm` before the optimizer step. The UNet is not wrapped.
"""

from __future__ import annotations

import torch

from loop_ray.config import ExperimentConfig
from loop_ray.training.deepspeed_engine import build_optimizer


class TorchEngine:
    def __init__(self, cfg: ExperimentConfig, params, grad_accum_steps: int):
        lrn = cfg.learner
        self.params = [p for p in params if p.requires_grad]
        self.optimizer = build_optimizer(cfg, self.params)
        self.gradient_accumulation_steps = grad_accum_steps
        self.max_grad_norm = lrn.max_grad_norm
        self.micro_steps = 0
        self._grad_norm: float | None = None

    def train(self) -> None:  # the UNet's mode is the policy's business; kept for API parity
        pass

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gradient_accumulation_steps).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gradient_accumulation_steps == 0

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self._grad_norm = float(norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.micro_steps += 1

    def get_global_grad_norm(self) -> float | None:
        """The pre-clipping global gradient norm of the last optimizer step."""
        return self._grad_norm

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "micro_steps": self.micro_steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.micro_steps = state["micro_steps"]
