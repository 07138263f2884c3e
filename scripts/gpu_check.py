"""Speed check of loop-ray's sampler and learner step on a Stable-Diffusion-2-shaped model.

The UNet has the real SD 2 base architecture (865M parameters, 64x64 latents, 1024-d cross
attention) with random weights; the VAE (8x upsampling to 512x512) and the CLIP text encoder (two
layers, 1024-d) are small and random, so the UNet dominates as it does in the real model. It
measures, on the same weights, steps, batch and guidance scale:

  * sampling images/s of loop-ray's DDIMPolicy.sample (DDIM eta=1 with stored latents and
    log-probs) against diffusers' own StableDiffusionPipeline (DDIM, eta=1), both with float32
    weights under bf16 autocast on a GPU;
  * one learner step: log_prob at a few sampled timesteps of each sample (one backward per
    timestep, gradients accumulated) + gradient clipping + AdamW step of the full UNet, under bf16
    autocast.

It prints one JSON object. `loop_ray_over_diffusers` is a throughput ratio, loop-ray's images/s
over diffusers' (above 1 loop-ray is faster), the convention `make bench` uses too. `--tiny` runs the same code on a tiny random SD-shaped stack (seconds on
a CPU) to check that the script works.

    python scripts/gpu_check.py            # on a GPU machine
    python scripts/gpu_check.py --tiny     # anywhere
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loop_ray.diffusion.ddim.components import SDComponents
from loop_ray.diffusion.ddim.policy import DDIMPolicy
from loop_ray.diffusion.ddim.tiny import tiny_sd_components
from loop_ray.diffusion.tiny_tokenizer import tiny_clip_tokenizer

# UNet2DConditionModel config of stabilityai/stable-diffusion-2-base (unet/config.json)
SD2_BASE_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "num_class_embeds": None,
}
# DDIM config of SD 2 base's scheduler (scaled_linear betas, epsilon prediction)
SD2_BASE_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def sd2_shaped_components(device: torch.device, seed: int = 0) -> SDComponents:
    """SD 2 base UNet (random), small random VAE with 8x upsampling and 2-layer 1024-d CLIP text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer(77)
    with torch.device(device):  # initialise on the device: a CPU init of 865M parameters is slow
        unet = UNet2DConditionModel(**SD2_BASE_UNET)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[32, 64, 64, 64], sample_size=512, scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
            num_attention_heads=16, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
    scheduler = DDIMScheduler(**SD2_BASE_SCHEDULER)
    return SDComponents(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up (kernels, allocator, cuDNN autotuning)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random SD-shaped stack (CPU smoke run)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch", type=int, default=None, help="images per sampling call (default 8, tiny 2)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50, tiny 4)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats after a warm-up (default 3, tiny 1)")
    parser.add_argument("--train-timesteps", type=int, default=None,
                        help="timesteps per sample in the learner step (default 4, tiny 2)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="autocast dtype on a GPU")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)
    batch = args.batch or (2 if args.tiny else 8)
    steps = args.steps or (4 if args.tiny else 50)
    repeats = args.repeats or (1 if args.tiny else 3)
    n_train = args.train_timesteps or (2 if args.tiny else 4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    autocast = device.type == "cuda" and dtype != torch.float32

    build_start = time.perf_counter()
    components = tiny_sd_components(seed=0) if args.tiny else sd2_shaped_components(device)
    build_s = time.perf_counter() - build_start
    policy = DDIMPolicy(components, num_steps=steps, guidance_scale=args.guidance, eta=1.0, device=device,
                             sample_dtype=dtype, seed=0)
    prompts = [f"a photo of a cat {i}" for i in range(batch)]

    # ---- sampling: loop-ray
    seeds = list(range(batch))
    loop_times = _timed(lambda: policy.sample(prompts, 1, seeds), device, repeats)

    # ---- sampling: diffusers on the same modules
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=policy.vae, text_encoder=policy.text_encoder, tokenizer=components.tokenizer, unet=policy.unet,
        scheduler=DDIMScheduler.from_config(components.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def run_pipe():
        generator = torch.Generator(device="cpu").manual_seed(0)
        with torch.autocast(device.type, dtype=dtype, enabled=autocast), torch.no_grad():
            return pipe(prompts, num_inference_steps=steps, guidance_scale=args.guidance, eta=1.0,
                        generator=generator, output_type="np").images

    pipe_times = _timed(run_pipe, device, repeats)

    # ---- one learner step: log_prob at n_train timesteps per sample + backward + AdamW
    trajectories = policy.sample(prompts, 1, seeds)
    unet = policy.unet
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)
    advantages = torch.linspace(-1, 1, batch, device=device)
    generator = torch.Generator().manual_seed(0)

    def learner_step():
        """Clipped-ratio loss at n_train random timesteps per sample; as in DDPO, one backward per
        timestep column (gradients accumulate), so activations of one [B] UNet batch live at a time."""
        idx = torch.stack([torch.randperm(steps, generator=generator)[:n_train] for _ in range(batch)])
        optimizer.zero_grad(set_to_none=True)
        for j in range(n_train):
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                logp = policy.log_prob(trajectories, idx[:, j])  # [B]
            old = trajectories.log_probs.gather(1, idx[:, j:j + 1])[:, 0].to(device)
            ratio = torch.exp(logp.float() - old)
            loss = -torch.minimum(advantages * ratio, advantages * ratio.clamp(1 - 1e-4, 1 + 1e-4)).mean()
            (loss / n_train).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    learn_times = _timed(learner_step, device, repeats)

    loop_ips = batch / statistics.median(loop_times)
    pipe_ips = batch / statistics.median(pipe_times)
    result = {
        "model": "tiny_sd" if args.tiny else "sd2-base-shaped UNet (random), small VAE/text encoder",
        "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "autocast": args.dtype if autocast else "off",
        "batch": batch,
        "ddim_steps": steps,
        "guidance_scale": args.guidance,
        "latent_shape": list(trajectories.latents.shape[2:]),
        "build_s": round(build_s, 2),
        "loop_ray_sample_s": [round(t, 4) for t in loop_times],
        "diffusers_sample_s": [round(t, 4) for t in pipe_times],
        "loop_ray_images_per_s": round(loop_ips, 3),
        "diffusers_images_per_s": round(pipe_ips, 3),
        "loop_ray_over_diffusers": round(loop_ips / pipe_ips, 3),
        "learner_step_s": [round(t, 4) for t in learn_times],
        "learner_step_median_s": round(statistics.median(learn_times), 4),
        "learner_timesteps_per_sample": n_train,
        "learner_samples_x_timesteps_per_s": round(batch * n_train / statistics.median(learn_times), 3),
    }
    if device.type == "cuda":
        result["learner_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
