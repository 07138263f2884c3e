"""The text-to-image policy: K DDIM trajectories per prompt, and log-probs of stored steps.

The policy pi_theta is the chain of Gaussian DDIM transitions p_theta(x_{t-1} | x_t, c) with
classifier-free guidance (Ho & Salimans 2022):

    eps_hat = eps_theta(x_t, t, "") + w * (eps_theta(x_t, t, c) - eps_theta(x_t, t, ""))

and each transition is one `ddim_step_with_logprob` (DDIM eq. 12, eta > 0). `sample` stores every
x_t and logp_old; `log_prob` recomputes the log-prob of stored transitions under the current weights
with autograd, which is what the importance ratio exp(logp - logp_old) of LOOP/PPO needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler

from loop_ray.diffusion.components import Components
from loop_ray.diffusion.logprob import ddim_sigma, ddim_step_with_logprob, draw_noise
from loop_ray.trajectory import TrajectoryBatch

_SEED_HIGH = 2**62  # seeds are drawn from [0, 2^62): they fit int64 tensors and torch.Generator


class DiffusionPolicy:
    """A `Components` stack driven as an RL policy.

    The UNet is the trainable part and stays reachable (and replaceable) as `self.unet`; it is
    called as `self.unet(x, t, encoder_hidden_states=...).sample`, so a DeepSpeed engine wrapping it
    can take its place. The text encoder and VAE are frozen (eval mode, requires_grad False). The
    scheduler is a private DDIMScheduler made from `components.scheduler.config` with `num_steps`
    timesteps (so a stack saved with another scheduler class still samples with DDIM).

    `seed` (keyword, optional) seeds the stream that invents per-sample seeds when `sample` gets
    none; None seeds that stream from OS entropy, so two samplers never repeat each other.
    """

    def __init__(
        self,
        components: Components,
        *,
        num_steps: int,
        guidance_scale: float,
        eta: float = 1.0,
        device: str | torch.device = "cpu",
        sample_dtype: torch.dtype = torch.float32,
        seed: int | None = None,
    ):
        self.device = torch.device(device)
        self.unet = components.unet.to(self.device)
        self.text_encoder = components.text_encoder.to(self.device).eval().requires_grad_(False)
        self.vae = components.vae
        if self.vae is not None:
            self.vae = self.vae.to(self.device).eval().requires_grad_(False)
        self.tokenizer = components.tokenizer
        self.scheduler = DDIMScheduler.from_config(components.scheduler.config)
        self.scheduler.set_timesteps(num_steps)
        self.timesteps = self.scheduler.timesteps.to(device="cpu", dtype=torch.long)  # [T]
        self.sigmas = ddim_sigma(self.scheduler, self.timesteps, eta)  # [T] float64, sigma_t of each step
        self.num_steps = num_steps
        self.guidance_scale = float(guidance_scale)
        self.eta = float(eta)
        self.sample_dtype = sample_dtype
        self._seed_stream = torch.Generator()
        if seed is None:
            self._seed_stream.seed()
        else:
            self._seed_stream.manual_seed(seed)
        self._empty_embeds: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder states [N, L, D] (float32, CPU) of prompts padded to the tokenizer's length."""
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0].float().cpu()

    def empty_embeds(self) -> torch.Tensor:
        """States [1, L, D] of the empty prompt, the unconditional branch of CFG (cached)."""
        if self._empty_embeds is None:
            self._empty_embeds = self.encode_prompts([""])
        return self._empty_embeds

    # ---------------------------------------------------------------------------------- model
    def _module(self) -> torch.nn.Module:
        """The UNet itself, also when `self.unet` is a wrapper (DeepSpeed engine, DDP) with `.module`."""
        return getattr(self.unet, "module", self.unet)

    def guided_output(
        self, x_t: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor
    ) -> torch.Tensor:
        """eps_hat of classifier-free guidance (the plain conditional output when w = 1).

        x_t [B, C, H, W], t [B] long, embeds [B, L, D]; inputs are cast to the UNet's dtype and the
        result is at least float32.
        """
        dtype = next(self._module().parameters()).dtype
        x_t, t = x_t.to(self.device, dtype), t.to(self.device)
        cond = prompt_embeds.to(self.device, dtype)
        if self.guidance_scale == 1.0:
            out = self.unet(x_t, t, encoder_hidden_states=cond).sample
            return out.to(torch.promote_types(out.dtype, torch.float32))
        uncond = negative_embeds.to(self.device, dtype)
        out = self.unet(
            torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])
        ).sample
        out_uncond, out_cond = out.to(torch.promote_types(out.dtype, torch.float32)).chunk(2)
        return out_uncond + self.guidance_scale * (out_cond - out_uncond)

    def _latent_shape(self) -> tuple[int, int, int]:
        config = self._module().config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return config.in_channels, height, width

    # ------------------------------------------------------------------------------- sampling
    def sample(
        self,
        prompts: list[str],
        k: int = 1,
        seeds: Sequence[int] | torch.Tensor | None = None,
        *,
        prompt_ids: Sequence[int] | torch.Tensor | None = None,
        group_ids: Sequence[int] | torch.Tensor | None = None,
        batch_size: int | None = None,
        version: int = 0,
    ) -> TrajectoryBatch:
        """K trajectories per prompt: B = len(prompts) * K samples, the K of prompt i contiguous.

        seeds [B]: sample i's x_T and every step's noise z come from its own torch.Generator seeded
        with seeds[i], so a sample depends only on (prompt, seed, weights), not on which samples
        share its batch or on `batch_size`. None draws B seeds from the policy's seed stream.
        prompt_ids / group_ids: one per prompt (repeated K times) or one per sample; defaults are
        the prompt's index in `prompts`, so the K samples of a prompt form one leave-one-out group.
        Runs without autograd in chunks of `batch_size` samples (default: all at once), under
        autocast to `sample_dtype` on a GPU; log-probs are float32. Tensors come back on the CPU.
        """
        num_prompts, total = len(prompts), len(prompts) * k
        if seeds is None:
            seeds = torch.randint(0, _SEED_HIGH, (total,), generator=self._seed_stream)
        seeds = torch.as_tensor(seeds, dtype=torch.long).reshape(-1)
        if seeds.numel() != total:
            raise ValueError(f"{seeds.numel()} seeds for {num_prompts} prompts x k={k} = {total} samples")
        default_ids = torch.arange(num_prompts)
        prompt_ids = _per_sample(
            prompt_ids if prompt_ids is not None else default_ids, num_prompts, k, "prompt_ids"
        )
        group_ids = _per_sample(
            group_ids if group_ids is not None else default_ids, num_prompts, k, "group_ids"
        )
        prompt_embeds = self.encode_prompts(prompts).repeat_interleave(k, dim=0)
        negative_embeds = self.empty_embeds().expand(total, -1, -1).clone()

        chunk = batch_size or total
        latents, log_probs, images = [], [], []
        for start in range(0, total, chunk):
            rows = slice(start, min(start + chunk, total))
            x, logp, img = self._sample_chunk(prompt_embeds[rows], negative_embeds[rows], seeds[rows])
            latents.append(x)
            log_probs.append(logp)
            images.append(img)
        return TrajectoryBatch(
            prompts=[p for p in prompts for _ in range(k)],
            prompt_ids=prompt_ids,
            group_ids=group_ids,
            seeds=seeds,
            prompt_embeds=prompt_embeds,
            negative_embeds=negative_embeds,
            latents=torch.cat(latents),
            timesteps=self.timesteps.expand(total, -1).clone(),
            log_probs=torch.cat(log_probs),
            images=torch.cat(images),
            version=version,
        )

    @torch.no_grad()
    def _sample_chunk(self, prompt_embeds, negative_embeds, seeds):
        """One chunk: x_T ~ N(0, I) then T DDIM steps; returns latents [b, T+1, ...], logp_old [b, T]
        and uint8 images, all on the CPU."""
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        x = draw_noise((len(seeds), *self._latent_shape()), generators, self.device)
        trajectory, log_probs = [x], []
        use_autocast = self.device.type == "cuda" and self.sample_dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.sample_dtype, enabled=use_autocast):
            for t in self.timesteps:
                t_batch = t.expand(len(seeds))
                eps_hat = self.guided_output(x, t_batch, prompt_embeds, negative_embeds)
                x, logp = ddim_step_with_logprob(
                    self.scheduler, eps_hat, t_batch, x, self.eta, generator=generators
                )
                trajectory.append(x)
                log_probs.append(logp.float())
            images = self.decode(x)
        latents = torch.stack(trajectory, dim=1).float().cpu()
        return latents, torch.stack(log_probs, dim=1).cpu(), images

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, H, W, 3] of x_0: VAE decode of x_0 / scaling_factor (+ shift_factor) for a
        latent model, x_0 itself for a pixel-space model; [-1, 1] maps to [0, 255]."""
        x0 = x0.to(self.device)
        if self.vae is None:
            image = x0
        else:
            config = self.vae.config
            z = x0 / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
            image = self.vae.decode(z.to(next(self.vae.parameters()).dtype)).sample
        image = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1).cpu()

    # ------------------------------------------------------------------------------- learning
    def log_prob(self, batch: TrajectoryBatch, step_indices: torch.Tensor) -> torch.Tensor:
        """log p_theta(latents[:, j+1] | latents[:, j]) of stored transitions, with autograd.

        step_indices: [B] (one step j per sample) -> [B], or [B, n] -> [B, n]. Uses the batch's
        timesteps and prompt embeddings, this policy's eta and guidance scale and the current UNet
        weights; with unchanged weights it reproduces batch.log_probs (ratio 1). Deterministic
        steps (sigma_t = 0) give 0.
        """
        if batch.num_steps != self.num_steps:
            raise ValueError(f"batch has {batch.num_steps} DDIM steps, the policy {self.num_steps}")
        idx = torch.as_tensor(step_indices, dtype=torch.long).to(batch.latents.device)
        one_per_sample = idx.dim() == 1
        if one_per_sample:
            idx = idx[:, None]
        size, n = idx.shape
        if size != len(batch):
            raise ValueError(f"step_indices has {size} rows for a batch of {len(batch)}")
        rows = torch.arange(size, device=idx.device)[:, None].expand(size, n)
        x_t = batch.latents[rows, idx].flatten(0, 1).to(self.device)
        x_prev = batch.latents[rows, idx + 1].flatten(0, 1).to(self.device)
        t = batch.timesteps.to(idx.device)[rows, idx].flatten()
        eps_hat = self.guided_output(
            x_t, t, batch.prompt_embeds.repeat_interleave(n, 0), batch.negative_embeds.repeat_interleave(n, 0)
        )
        _, logp = ddim_step_with_logprob(self.scheduler, eps_hat, t.cpu(), x_t, self.eta, prev_sample=x_prev)
        logp = logp.view(size, n)
        return logp[:, 0] if one_per_sample else logp

    def trainable_steps(self, skip_first: int = 0, skip_last: int = 0) -> torch.Tensor:
        """Step indices j with sigma_t > 0, leaving out the first `skip_first` and last `skip_last`
        steps (the first step's gradient can be meaningless when abar_t ~ 0, the last step's tiny
        sigma_t can dominate ratios; see TOY-WORLD-NOTES)."""
        j = torch.arange(self.num_steps)
        keep = (self.sigmas > 0) & (j >= skip_first) & (j < self.num_steps - skip_last)
        return j[keep]

    # -------------------------------------------------------------------------------- weights
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def _trainable_keys(self) -> list[str]:
        keys = list(self._module().state_dict().keys())
        lora = [k for k in keys if "lora_" in k]
        return lora or keys

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a sampler needs from the learner: the LoRA adapters (keys with "lora_") if the
        UNet has any, else the whole UNet state dict; detached CPU copies."""
        state = self._module().state_dict()
        return {k: state[k].detach().cpu().clone() for k in self._trainable_keys()}

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load what `trainable_state_dict` gave; every trainable key must be present, no other."""
        expected = set(self._trainable_keys())
        missing, unexpected = expected - state_dict.keys(), state_dict.keys() - expected
        if missing or unexpected:
            raise KeyError(
                f"trainable state dict mismatch: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        self._module().load_state_dict(state_dict, strict=False)


def _per_sample(ids, num_prompts: int, k: int, name: str) -> torch.Tensor:
    """[B] long ids from one id per prompt (repeated K times) or one per sample."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() == num_prompts:
        return ids.repeat_interleave(k)
    if ids.numel() == num_prompts * k:
        return ids
    raise ValueError(f"{name}: {ids.numel()} values for {num_prompts} prompts x k={k}")
