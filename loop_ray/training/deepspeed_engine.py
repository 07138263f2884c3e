"""The learner's DeepSpeed engine: config dict from `cfg.learner`, client AdamW, ZeRO stage.

The optimizer is torch's AdamW handed to DeepSpeed as a client optimizer, so no DeepSpeed op has
to be compiled (its fused Adam does not build on a CPU). bf16/fp16 use DeepSpeed's `torch_autocast`:
master weights and optimizer state stay fp32, the UNet forward runs under autocast, and the policy
needs no input casting. The loss of each micro-step (one minibatch at one sampled timestep) goes
through `engine.backward`, which divides it by `gradient_accumulation_steps`; `engine.step` steps
the optimizer at the accumulation boundary, after gradient clipping.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from loop_ray.config import ExperimentConfig
from loop_ray.filehash import write_hashed

_AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def deepspeed_config(cfg: ExperimentConfig, grad_accum_steps: int) -> dict:
    lrn = cfg.learner
    config = {
        "train_micro_batch_size_per_gpu": lrn.minibatch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": lrn.max_grad_norm,
        "zero_optimization": {"stage": lrn.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if lrn.precision in _AUTOCAST_DTYPES:
        config["torch_autocast"] = {"enabled": True, "dtype": _AUTOCAST_DTYPES[lrn.precision]}
    return config


def build_optimizer(cfg: ExperimentConfig, params) -> torch.optim.Optimizer:
    """`learner.optimizer`: torch's AdamW (the paper's), or SGD with `learner.sgd_momentum`; both with
    `learner.lr` and `learner.weight_decay`."""
    lrn = cfg.learner
    if lrn.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lrn.lr, momentum=lrn.sgd_momentum, weight_decay=lrn.weight_decay)
    return torch.optim.AdamW(params, lr=lrn.lr, betas=tuple(lrn.adam_betas), eps=lrn.adam_eps,
                             weight_decay=lrn.weight_decay)


def build_engine(cfg: ExperimentConfig, policy, grad_accum_steps: int):
    """Wrap the policy's UNet in a DeepSpeed engine (in place: `policy.unet` becomes the engine).
    torch.distributed must already be initialised."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    params = policy.trainable_parameters()
    optimizer = build_optimizer(cfg, params)
    engine, _, _, _ = deepspeed.initialize(
        model=policy.unet,
        optimizer=optimizer,
        model_parameters=params,
        config=deepspeed_config(cfg, grad_accum_steps),
        dist_init_required=False,
    )
    policy.unet = engine
    return engine


def held_grad_norm(engine, params) -> float | None:
    """The 2-norm of the gradients held in `params` before `engine.step` (ZeRO stage 0, where
    DeepSpeed clips without reporting the norm); None when no parameter holds one (ZeRO stages 1-2
    keep partitioned gradients and report the norm themselves)."""
    grads = [p.grad.detach().float() for p in params if p.grad is not None]
    if not grads:
        return None
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
    return norm / scaler.get_scale() if scaler is not None else norm


def engine_grad_norm(engine, fallback: float | None) -> float | None:
    """The pre-clipping gradient norm of the step just taken: ZeRO's own report (already divided
    by its loss scale), else `fallback` (the norm `held_grad_norm` measured before the step)."""
    norm = engine.get_global_grad_norm()
    return fallback if norm is None else float(norm)


@contextmanager
def hashed_saves(engine, folder: str, written: dict[str, dict]) -> Iterator[None]:
    """While active, the state files DeepSpeed writes through its (default, torch) checkpoint engine
    are written through `write_hashed`: each one's size and SHA-256 land in `written` under its path
    relative to `folder`, taken from the bytes as they were written. Files DeepSpeed writes another
    way (its `latest` tag file, its recovery scripts; any file of another checkpoint engine) are not
    recorded: whoever builds the manifest hashes those from disk."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    ckpt = engine.checkpoint_engine
    if type(ckpt) is not TorchCheckpointEngine:
        yield
        return

    def save(state_dict, path):  # TorchCheckpointEngine.save, through a hashing stream
        written[os.path.relpath(path, folder).replace(os.sep, "/")] = write_hashed(
            path, lambda f: torch.save(state_dict, f, _use_new_zipfile_serialization=ckpt.zipfile_serialization)
        )

    ckpt.save = save  # an instance attribute: shadows the method until removed
    try:
        yield
    finally:
        del ckpt.save
