"""The DDIM text-to-image policy: K trajectories per prompt, and log-probs of stored steps.

The policy pi_theta is the chain of Gaussian DDIM transitions p_theta(x_{t-1} | x_t, c) with
classifier-free guidance (Ho & Salimans 2022):

    eps_hat = eps_theta(x_t, t, "") + w * (eps_theta(x_t, t, c) - eps_theta(x_t, t, ""))

and each transition is one `ddim_step_with_logprob` (DDIM eq. 12, eta > 0). Sampling (which steps
are stochastic, how a group shares noise), log-prob recomputation and the trainable weights are
`PolicyBase`'s; this module supplies the UNet call with guidance and the DDIM transition.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler

from loop_ray.diffusion.ddim.components import SDComponents
from loop_ray.diffusion.ddim.logprob import alphas_at, ddim_sigma, ddim_step_with_logprob
from loop_ray.diffusion.policy_base import PolicyBase


class DDIMPolicy(PolicyBase):
    """A `SDComponents` stack driven as an RL policy.

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
        components: SDComponents,
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
        self._init_seed_stream(seed)
        self._empty_embeds: torch.Tensor | None = None
        self.parametrisation = self.scheduler.config.prediction_type  # epsilon, v_prediction or sample

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

    def _conditioning(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeds": self.encode_prompts(prompts),
            "negative_embeds": self.empty_embeds().expand(len(prompts), -1, -1).clone(),
        }

    # ---------------------------------------------------------------------------------- model
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

    def _model_output(self, x, steps, cond):
        return self.guided_output(x, self.timesteps[steps], cond["prompt_embeds"], cond["negative_embeds"])

    def _transition(self, steps, model_output, x, eta, *, noise=None, prev_sample=None):
        return ddim_step_with_logprob(
            self.scheduler, model_output, self.timesteps[steps], x, eta, prev_sample=prev_sample, noise=noise
        )

    def forward_coefficients(self, steps):
        """DDPM's variance-preserving process at step j's timestep: (sqrt(abar_t), sqrt(1 - abar_t))."""
        abar, _ = alphas_at(self.scheduler, self.timesteps[torch.as_tensor(steps).cpu()])
        return abar.sqrt(), (1 - abar).sqrt()

    def _latent_shape(self) -> tuple[int, int, int]:
        config = self._module().config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return config.in_channels, height, width

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
