"""The flow-matching text-to-image policy (SD3 / SD3.5, FLUX.1): the chain of SDE steps of the flow ODE.

pi_theta is the chain of Gaussian transitions p_theta(x_{s'} | x_s, c) of `flow_step_with_logprob`
(Flow-GRPO's SDE, or Flow-CPS's coefficient-preserving step) driven by the transformer's velocity:

    SD3:  v_hat = v_theta(x_s, s, c_neg) + w (v_theta(x_s, s, c) - v_theta(x_s, s, c_neg))   (two-pass CFG)
    FLUX: v_hat = v_theta(x_s, s, c, guidance=w)   (FLUX.1-dev is guidance-distilled: one pass)

Sampling (stochastic steps, group noise, seeds, chunking), log-prob recomputation and the trainable
weights are `PolicyBase`'s; this module supplies the transformer call and the flow transition. The
schedule is the pipeline's own: FlowMatchEulerDiscreteScheduler from the model's config, set up as
StableDiffusion3Pipeline (static shift, or mu from the image size with dynamic shifting) or FluxPipeline
(sigmas 1 .. 1/T, mu from the image size) set it up, so a = 0 retraces the pipeline's sampler.
Latents are stored as [C, H, W] (FLUX's are packed into 2 x 2 patch tokens only for the call).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from loop_ray.diffusion.flow.logprob import flow_step_coefficients, flow_step_with_logprob
from loop_ray.diffusion.flow.models import FlowComponents
from loop_ray.diffusion.flow.text import encode_prompts, flux_position_ids, pack_latents, unpack_latents
from loop_ray.diffusion.policy_base import PolicyBase


class FlowPolicy(PolicyBase):
    """A `FlowComponents` stack driven as an RL policy.

    The transformer is the trainable network, reachable (and replaceable by a DeepSpeed engine) as
    `self.unet`, the name the learner uses for every policy (`self.transformer` is the same). Text
    encoders and the VAE are frozen. `noise_level` is a (the base class's `eta`); `sigmas` is each
    step's std at that level (0 where a step is deterministic anyway: CPS's last step).
    `resolution`: image side in pixels (None: the pipeline's default, sample_size x VAE factor for SD3,
    128 x VAE factor for FLUX). `max_sequence_length`: T5 tokens (None: the pipeline's default).
    """

    network_name = "transformer"  # the checkpoint folder of the trained network (diffusers layout)

    def __init__(
        self,
        components: FlowComponents,
        *,
        num_steps: int,
        guidance_scale: float,
        noise_level: float = 0.7,
        sde: str = "sde",
        resolution: int | None = None,
        max_sequence_length: int | None = None,
        device: str | torch.device = "cpu",
        sample_dtype: torch.dtype = torch.float32,
        seed: int | None = None,
    ):
        self.kind = components.kind
        self.device = torch.device(device)
        self.components = components
        self.unet = components.transformer.to(self.device)
        for encoder in components.text_encoders():
            encoder.to(self.device).eval().requires_grad_(False)
        self.vae = components.vae.to(self.device).eval().requires_grad_(False)
        self.guidance_scale = float(guidance_scale)
        if self.kind == "flux" and not self.unet.config.guidance_embeds and self.guidance_scale != 1.0:
            raise ValueError(f"this FLUX transformer has no guidance embedding: guidance_scale {guidance_scale} "
                             "would be ignored; set sampling.guidance_scale: 1 (two-pass CFG is not supported)")
        self.max_sequence_length = max_sequence_length
        self.num_steps, self.eta, self.sde = num_steps, float(noise_level), sde
        self.sample_dtype = sample_dtype
        self.height, self.width = self._latent_size(resolution)
        self.scheduler = self._set_up_scheduler(components.scheduler.config, num_steps)
        self.schedule = self.scheduler.sigmas.to("cpu")  # [T + 1] noise levels s_j, shift applied, ending in 0
        self.timesteps = self.scheduler.timesteps.to("cpu", torch.float32)  # [T] = 1000 s_j, the model's input
        steps = torch.arange(num_steps)
        self.sigmas = flow_step_coefficients(self.schedule, steps, self.eta, sde)[2]  # [T] float64 step std
        self._init_seed_stream(seed)
        self._negative: dict[str, torch.Tensor] | None = None

    @property
    def transformer(self) -> torch.nn.Module:
        return self.unet

    # --------------------------------------------------------------------------- shapes, schedule
    def _latent_size(self, resolution: int | None) -> tuple[int, int]:
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        patch = self.unet.config.patch_size if self.kind == "sd3" else 2  # FLUX packs 2 x 2 latent patches
        if resolution is None:
            resolution = (self.unet.config.sample_size if self.kind == "sd3" else 128) * factor
        if resolution % (factor * patch):
            raise ValueError(f"resolution {resolution}: must be a multiple of {factor * patch} (VAE factor {factor} x "
                             f"patch {patch}) for this {self.kind} model")
        return resolution // factor, resolution // factor

    def _set_up_scheduler(self, config, num_steps: int) -> FlowMatchEulerDiscreteScheduler:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        patch = self.unet.config.patch_size if self.kind == "sd3" else 2
        tokens = (self.height // patch) * (self.width // patch)  # the image sequence length
        mu = None
        if self.kind == "flux" or scheduler.config.use_dynamic_shifting:
            mu = calculate_shift(tokens, scheduler.config.base_image_seq_len, scheduler.config.max_image_seq_len,
                                 scheduler.config.base_shift, scheduler.config.max_shift)
        if self.kind == "flux":
            scheduler.set_timesteps(num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        else:
            scheduler.set_timesteps(num_steps, mu=mu)
        return scheduler

    def _latent_shape(self) -> tuple[int, int, int]:
        channels = self.vae.config.latent_channels
        return channels, self.height, self.width

    # ----------------------------------------------------------------------------------- text
    def _conditioning(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        embeds, pooled = encode_prompts(self.components, prompts, self.max_sequence_length)
        cond = {"prompt_embeds": embeds, "pooled_embeds": pooled}
        if self.kind == "sd3":  # the empty prompt's, for two-pass CFG (cached)
            if self._negative is None:
                neg, neg_pooled = encode_prompts(self.components, [""], self.max_sequence_length)
                self._negative = {"negative_embeds": neg, "negative_pooled_embeds": neg_pooled}
            cond.update({k: v.expand(len(prompts), *v.shape[1:]).clone() for k, v in self._negative.items()})
        return cond

    # ---------------------------------------------------------------------------------- model
    def _model_output(self, x: torch.Tensor, steps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The guided velocity v_hat at x [B, C, H, W] (at least float32)."""
        dtype = next(self._module().parameters()).dtype
        x = x.to(self.device, dtype)
        t = self.timesteps[steps.cpu()].to(self.device)
        embeds = cond["prompt_embeds"].to(self.device, dtype)
        pooled = cond["pooled_embeds"].to(self.device, dtype)
        if self.kind == "flux":
            return self._flux_velocity(x, t, embeds, pooled)
        if self.guidance_scale == 1.0:
            out = self.unet(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample
            return out.to(torch.promote_types(out.dtype, torch.float32))
        out = self.unet(
            hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
            encoder_hidden_states=torch.cat([cond["negative_embeds"].to(self.device, dtype), embeds]),
            pooled_projections=torch.cat([cond["negative_pooled_embeds"].to(self.device, dtype), pooled]),
        ).sample
        v_uncond, v_cond = out.to(torch.promote_types(out.dtype, torch.float32)).chunk(2)
        return v_uncond + self.guidance_scale * (v_cond - v_uncond)

    parametrisation = "velocity"

    def forward_coefficients(self, steps):
        """Rectified flow at step j's noise level s_j: (1 - s_j, s_j)."""
        s = self.schedule[torch.as_tensor(steps).cpu()].to(torch.float64)
        return 1 - s, s

    def _flux_velocity(self, x, t, embeds, pooled):
        """FLUX: packed latents, timestep s = t / 1000, the distilled guidance w as an input."""
        text_ids, image_ids = flux_position_ids(embeds.shape[1], self.height, self.width)
        guidance = None
        if self._module().config.guidance_embeds:
            guidance = torch.full((len(x),), self.guidance_scale, device=self.device, dtype=torch.float32)
        out = self.unet(
            hidden_states=pack_latents(x), timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
            encoder_hidden_states=embeds, txt_ids=text_ids.to(self.device, x.dtype),
            img_ids=image_ids.to(self.device, x.dtype),
        ).sample
        out = unpack_latents(out, self.height, self.width)
        return out.to(torch.promote_types(out.dtype, torch.float32))

    def _transition(self, steps, model_output, x, eta, *, noise=None, prev_sample=None):
        return flow_step_with_logprob(model_output, x, self.schedule, steps.cpu(), eta, prev_sample=prev_sample,
                                      noise=noise, sde=self.sde)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, H, W, 3]: VAE decode of x_0 / scaling_factor + shift_factor, [-1, 1] -> [0, 255]."""
        config = self.vae.config
        z = x0.to(self.device) / config.scaling_factor + (config.shift_factor or 0.0)
        image = self.vae.decode(z.to(next(self.vae.parameters()).dtype)).sample
        image = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1).cpu()


def build_flow_policy(cfg, device: str | torch.device = "cpu") -> FlowPolicy:
    """The FlowPolicy of an ExperimentConfig with a flow `model.kind` (sd3, flux, tiny_sd3, tiny_flux):
    LoRA adapters on the transformer if `model.lora_rank > 0` (Flow-GRPO's target layers), else the
    parameters `model.trainable` / `model.freeze` select; sampling settings from `cfg.sampling`."""
    from loop_ray.diffusion.flow.models import (
        LORA_TARGETS,
        TINY_RESOLUTION,
        tiny_flux_components,
        tiny_sd3_components,
    )
    from loop_ray.diffusion.kinds import SAMPLE_DTYPES

    kind, model, sampling = cfg.model.kind, cfg.model, cfg.sampling
    resolution = sampling.flow_resolution
    if kind == "tiny_sd3":
        components = tiny_sd3_components(model.seed)
    elif kind == "tiny_flux":
        components = tiny_flux_components(model.seed)
    elif kind in ("sd3", "flux"):
        from loop_ray.diffusion.flow.loading import load_flow_components

        frozen = SAMPLE_DTYPES[model.sample_dtype] if torch.device(device).type == "cuda" else torch.float32
        components = load_flow_components(model.path, kind, model.revision, frozen_dtype=frozen)
    else:
        raise ValueError(f"model.kind={kind!r} is not a flow-matching model")
    if kind.startswith("tiny_") and resolution is None:
        resolution = TINY_RESOLUTION
    if model.lora_rank > 0:
        from loop_ray.diffusion.lora import add_lora

        alpha = model.lora_alpha if model.lora_alpha is not None else model.lora_rank
        add_lora(components.transformer, model.lora_rank, alpha, target_modules=LORA_TARGETS[components.kind],
                 seed=cfg.seed)
    elif model.trainable != "all" or model.freeze:
        from loop_ray.diffusion.trainable import select_trainable

        select_trainable(components.transformer, model.trainable, model.freeze)
    return FlowPolicy(
        components, num_steps=sampling.num_steps, guidance_scale=sampling.guidance_scale,
        noise_level=sampling.flow_noise_level, sde=sampling.flow_sde, resolution=resolution,
        max_sequence_length=model.max_sequence_length, device=device, sample_dtype=SAMPLE_DTYPES[model.sample_dtype],
    )
