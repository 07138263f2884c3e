"""Pre-train the embedded world's text-to-image model on rendered scenes.

DDPM epsilon-prediction loss with Min-SNR-gamma weighting, w(t) = min(SNR(t), gamma) / SNR(t);
half of each batch's timesteps uniform on [0, 1000), half uniform on [400, 850] (where the
layout and the shapes are decided); 10 % of prompts replaced by "" (for classifier-free guidance);
AdamW with linear warm-up then cosine decay; gradient norm clipped at 1; an exponential moving
average (EMA) of the weights is what gets saved. Training images are rendered on the fly from
the "pretrain" prompt split (by default half one-object prompts, a quarter each of the two
two-object forms), every draw fixed by (seed, step), so the same command with the same seed gives
the same checkpoint (bit for bit on one machine and thread count; up to floating-point noise
across machines). The defaults took about 20-45 min on one thread of a shared 2-core machine.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from loop_ray.toy.grammar import prompt_split
from loop_ray.toy.model import (
    TINY_SPEC,
    ToyModelSpec,
    build_toy_components,
    count_parameters,
    default_model_path,
    save_toy_model,
    training_scheduler,
)
from loop_ray.toy.render import render_batch
from loop_ray.toy.tokenizer import tokenize
from loop_ray.utils import pin_threads

PROMPT_FORMS = ("one_object", "two_object", "two_object_position")
FOCUS_RANGE = (400, 850)


@dataclasses.dataclass
class PretrainSettings:
    """What `train` does (the `loop-ray pretrain-toy` options; defaults: the committed model's run)."""

    out: str = dataclasses.field(default_factory=lambda: str(default_model_path()))
    steps: int = 3000
    batch_size: int = 32
    seed: int = 0
    lr: float = 1e-3
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.01
    ema: float = 0.995  # EMA decay
    cfg_dropout: float = 0.1  # share of empty prompts
    min_snr: float = 5.0  # Min-SNR gamma
    one_object_share: float = 0.5  # the two two-object forms split the rest equally
    threads: int = 1  # torch threads
    device: str = "cpu"  # torch device to train on (data are rendered on the CPU)
    tiny: bool = False  # a tiny 16x16 model (tests)
    image_size: int | None = None  # image side in pixels (None: the spec's)
    channels: str | None = None  # UNet block channels, comma-separated, e.g. "16,32,32"
    norm_groups: int | None = None  # GroupNorm groups (must divide every channel count)
    no_progress: bool = False

    def check(self) -> None:
        """ValueError naming the first option out of range."""
        for name in ("steps", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError("--ema must be in [0, 1)")
        if not 0.0 <= self.one_object_share <= 1.0:
            raise ValueError("--one-object-share must be in [0, 1]")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError("--cfg-dropout must be in [0, 1)")
        model_spec(self)


class PromptSampler:
    """Draws a batch of (prompt, render seed) from the pre-training split, fixed by (seed, step)."""

    def __init__(self, seed: int, cfg_dropout: float, one_object_share: float = 0.5):
        by_cat: dict[str, list[str]] = {c: [] for c in PROMPT_FORMS}
        for prompt, cat in prompt_split("pretrain"):
            by_cat[cat].append(prompt)
        self.categories = list(PROMPT_FORMS)
        rest = (1.0 - one_object_share) / 2
        self.weights = np.asarray([one_object_share, rest, rest])
        self.by_cat = by_cat
        self.seed = seed
        self.cfg_dropout = cfg_dropout

    def batch(self, step: int, size: int) -> tuple[list[str], list[str], list[int]]:
        """(rendered prompts, conditioning prompts with dropout, render seeds) for a step."""
        rng = np.random.default_rng([self.seed, step])
        cats = rng.choice(len(self.categories), size=size, p=self.weights)
        prompts = [self.by_cat[self.categories[c]][rng.integers(len(self.by_cat[self.categories[c]]))] for c in cats]
        seeds = rng.integers(0, 2**31 - 1, size=size).tolist()
        drop = rng.random(size) < self.cfg_dropout
        cond = ["" if d else p for p, d in zip(prompts, drop)]
        return prompts, cond, seeds


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def sample_timesteps(gen: torch.Generator, size: int, num_train: int) -> torch.Tensor:
    """Half uniform over [0, num_train), half uniform over FOCUS_RANGE (scaled to num_train)."""
    lo, hi = (int(v * num_train / 1000) for v in FOCUS_RANGE)
    uniform = torch.randint(0, num_train, (size,), generator=gen)
    focus = torch.randint(lo, hi + 1, (size,), generator=gen)
    pick = torch.rand(size, generator=gen) < 0.5
    return torch.where(pick, focus, uniform)


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon prediction, SNR(t) = abar_t / (1 - abar_t)."""
    abar = alphas_cumprod[t]
    snr = abar / (1.0 - abar)
    return torch.clamp(snr, max=gamma) / snr


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def model_spec(args: PretrainSettings) -> ToyModelSpec:
    """The model sizes: the tiny or default spec, with --image-size / --channels / --norm-groups on top."""
    spec = TINY_SPEC if args.tiny else ToyModelSpec()
    changes = {}
    if getattr(args, "image_size", None):
        changes["image_size"] = args.image_size
    if getattr(args, "channels", None):
        changes["channels"] = tuple(int(c) for c in str(args.channels).split(","))
    if getattr(args, "norm_groups", None):
        changes["norm_groups"] = args.norm_groups
    spec = dataclasses.replace(spec, **changes)
    if len(spec.channels) != len(spec.down_blocks) or any(c % spec.norm_groups for c in spec.channels):
        raise ValueError(
            f"--channels {spec.channels} needs {len(spec.down_blocks)} values, "
            f"each divisible by --norm-groups {spec.norm_groups}"
        )
    return spec


def train(args: PretrainSettings) -> dict:
    """Run the pre-training described by `args`, save the EMA model to args.out, return its log."""
    pin_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = model_spec(args)
    comps = build_toy_components(spec, seed=args.seed)
    device = torch.device(args.device)
    unet, text_encoder = comps.unet.to(device).train(), comps.text_encoder.to(device).train()
    unet.to(memory_format=torch.channels_last)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    noise_scheduler = training_scheduler(comps.scheduler)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    num_train = noise_scheduler.config.num_train_timesteps
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup, args.steps))
    sampler = PromptSampler(args.seed, args.cfg_dropout, args.one_object_share)
    gen = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    start = time.time()
    bar = tqdm(range(args.steps), desc="pretrain-toy", disable=args.no_progress, file=sys.stderr)
    for step in bar:
        prompts, cond, seeds = sampler.batch(step, args.batch_size)
        images = torch.from_numpy(render_batch(prompts, seeds, spec.image_size))
        x0 = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps(gen, args.batch_size, num_train)
        x_t = noise_scheduler.add_noise(x0, noise, t)
        x_t, noise, t = (v.to(device) for v in (x_t, noise, t))
        x_t = x_t.contiguous(memory_format=torch.channels_last)
        emb = text_encoder(tokenize(comps.tokenizer, cond).to(device))[0]
        pred = unet(x_t, t, emb).sample
        per_sample = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (min_snr_weights(alphas_cumprod, t, args.min_snr) * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"pretrain-toy: loss is {loss.item()} at step {step}")
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
    wall = time.time() - start
    comps.unet = ema_unet.to("cpu", memory_format=torch.contiguous_format)
    comps.text_encoder = ema_text.to("cpu")
    out = save_toy_model(comps, args.out)
    log = {
        "args": {k: v for k, v in dataclasses.asdict(args).items() if k != "no_progress"},
        "wall_seconds": round(wall, 1),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "unet_parameters": count_parameters(ema_unet),
        "text_encoder_parameters": count_parameters(ema_text),
        "loss_first_50": float(np.mean(losses[:50])),
        "loss_last_50": float(np.mean(losses[-50:])),
        "loss_every_50": [round(float(np.mean(losses[i : i + 50])), 5) for i in range(0, len(losses), 50)],
    }
    (out / "pretrain_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log
