"""`loop-ray bench` / `make bench`: speed and memory against baselines run side by side.

Every ratio is a throughput ratio, loop-ray's rate over the baseline's (the baseline's time over
ours for the same work): above 1 loop-ray is faster, below 1 slower. Each figure is the median of
`--repeats` timed runs after a warm-up, with its spread (min-max):
  sampler      loop-ray's policy sampling (log-probs and every latent stored) against diffusers' own
               sampling on the same weights, steps, batch and guidance: StableDiffusionPipeline for
               the tiny SD-shaped stack; for the pixel-space embedded model, which has no diffusers
               pipeline class, the loop a pipeline runs (UNet with CFG + DDIMScheduler.step); and the
               flow policy on a tiny SD3 stack against StableDiffusion3Pipeline (that row's ratio is
               images/s, higher is faster; the others' are seconds)
  learner      one learner phase (update_on_shard through DeepSpeed: clipped IS loss, accumulation,
               clipping, AdamW) against the bare forward+backward passes it must do
  end_to_end   one iteration of the Ray system (sync, then async) against the same iteration's parts
               run in one process without Ray (loop_ray.training.single_process)
  weights      publication of the trainable weights through the object store: seconds and MB/s, for
               the embedded model and an SD2-shaped UNet
  memory       peak RSS of each role
It writes bench.json and bench.md under the output folder and prints the table.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def throughput_ratio(ours: dict, baseline: dict) -> dict:
    """The throughput of `ours` over that of `baseline` (two `timed` results of the same work, so
    the baseline's time over ours; higher is faster): the median ratio and the spread from the
    extremes."""
    return {"median": baseline["median_s"] / ours["median_s"], "low": baseline["min_s"] / ours["max_s"],
            "high": baseline["max_s"] / ours["min_s"]}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------ sampler
def _diffusers_loop(components, prompts: list[str], num_steps: int, guidance: float, seed: int):
    """What a diffusers pipeline does for a pixel-space text-conditioned UNet: CFG and
    DDIMScheduler.step (eta 1) over the schedule; no log-probs, no stored latents."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(components.scheduler.config)
    sched.set_timesteps(num_steps)
    tok = components.tokenizer
    with torch.no_grad():
        ids = tok(prompts + [""] * len(prompts), padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        emb = components.text_encoder(ids)[0]
        unet = components.unet
        size = unet.config.sample_size
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(len(prompts), unet.config.in_channels, size, size, generator=g)
        for t in sched.timesteps:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
            cond, uncond = out.chunk(2)
            eps = uncond + guidance * (cond - uncond)
            x = sched.step(eps, t, x, eta=1.0, generator=g).prev_sample
    return x


def bench_sampler(repeats: int, batch: int, steps: int, guidance: float) -> dict:
    from diffusers import StableDiffusionPipeline

    from loop_ray.diffusion.ddim.policy import DDIMPolicy
    from loop_ray.diffusion.ddim.tiny import tiny_sd_components
    from loop_ray.toy.model import load_toy_components

    prompts = ["a red circle and a blue square"] * batch
    out = {}
    # the embedded model
    comps = load_toy_components(None)
    policy = DDIMPolicy(comps, num_steps=steps, guidance_scale=guidance, eta=1.0)
    seeds = list(range(batch))
    ours = timed(lambda: policy.sample(prompts, 1, seeds, batch_size=batch), repeats)
    ref = timed(lambda: _diffusers_loop(comps, prompts, steps, guidance, 0), repeats)
    out["embedded"] = {"loop_ray": ours, "diffusers_loop": ref, "throughput_ratio": throughput_ratio(ours, ref),
                       "images_per_s": batch / ours["median_s"], "batch": batch, "steps": steps}
    # the tiny SD-shaped stack (latent space, VAE decode)
    comps = tiny_sd_components(0)
    policy = DDIMPolicy(comps, num_steps=steps, guidance_scale=guidance, eta=1.0)
    pipe = StableDiffusionPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=policy.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    size = comps.unet.config.sample_size * 2 ** (len(comps.vae.config.block_out_channels) - 1)
    ours = timed(lambda: policy.sample(prompts, 1, seeds, batch_size=batch), repeats)
    ref = timed(lambda: pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, eta=1.0, height=size,
                             width=size, generator=torch.Generator().manual_seed(0), output_type="np"), repeats)
    out["tiny_sd"] = {"loop_ray": ours, "diffusers_pipeline": ref, "throughput_ratio": throughput_ratio(ours, ref),
                      "images_per_s": batch / ours["median_s"], "batch": batch, "steps": steps}
    out["tiny_sd3_flow"] = bench_flow_sampler(repeats, batch, steps)
    return out


def bench_flow_sampler(repeats: int, batch: int, steps: int, guidance: float = 4.5) -> dict:
    """The flow policy (Flow-GRPO's SDE, a = 0.7, every latent and log-prob stored) against a bare
    diffusers StableDiffusion3Pipeline on the same tiny SD3 weights, steps, batch, CFG and T5 length.
    The throughput ratio is images/s of loop-ray over images/s of diffusers: higher is faster."""
    from loop_ray.diffusion.flow.models import TINY_RESOLUTION, pipeline_class, tiny_sd3_components
    from loop_ray.diffusion.flow.policy import FlowPolicy

    prompts = ["a red circle and a blue square"] * batch
    comps = tiny_sd3_components(0)
    policy = FlowPolicy(comps, num_steps=steps, guidance_scale=guidance, noise_level=0.7, resolution=TINY_RESOLUTION,
                        max_sequence_length=8)
    pipe = pipeline_class("sd3")(**comps.pipeline_modules())
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(batch))
    ours = timed(lambda: policy.sample(prompts, 1, seeds, batch_size=batch), repeats)
    ref = timed(lambda: pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=TINY_RESOLUTION,
                             width=TINY_RESOLUTION, max_sequence_length=8, output_type="np",
                             generator=torch.Generator().manual_seed(0)), repeats)
    return {"loop_ray": ours, "diffusers_pipeline": ref, "throughput_ratio": throughput_ratio(ours, ref),
            "images_per_s": batch / ours["median_s"], "batch": batch, "steps": steps}


# ------------------------------------------------------------------------------------------ learner
def bench_learner(repeats: int) -> dict:
    """update_on_shard through a real DeepSpeed engine (one gloo rank) vs the bare passes."""
    import torch.distributed as dist

    from loop_ray.config import load_config
    from loop_ray.diffusion.factory import build_policy
    from loop_ray.training.deepspeed_engine import build_engine
    from loop_ray.training.update import grad_accum_steps, train_steps_per_sample, update_on_shard

    cfg = load_config("configs/toy.yaml", ["learner.num_workers=1", "sampling.prompts_per_iteration=4",
                                           "learner.minibatch_size=8", "learner.minibatches_per_step=2",
                                           "algorithm.inner_epochs=1"])
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group("gloo", rank=0, world_size=1)
    policy = build_policy(cfg)
    batch = policy.sample(["a red circle and a blue square"] * 4, 4, list(range(16)), batch_size=16)
    adv = torch.randn(len(batch))
    steps = policy.trainable_steps(cfg.algorithm.skip_first_steps, cfg.algorithm.skip_last_steps)
    n_steps = train_steps_per_sample(cfg, len(steps))
    engine = build_engine(cfg, policy, grad_accum_steps(cfg, len(steps)))
    phase = timed(lambda: update_on_shard(engine, policy, batch, adv, cfg, torch.Generator().manual_seed(0)), repeats)
    unet = engine.module
    mbs = cfg.learner.minibatch_size

    def bare():  # the same micro-steps: CFG forward of the UNet on a minibatch at one step + backward
        for first in range(0, len(batch), mbs):
            sub = batch.select(slice(first, first + mbs))
            for j in range(n_steps):
                idx = steps[j % len(steps)]
                x = sub.latents[:, idx]
                t = sub.timesteps[:, idx]
                emb = torch.cat([sub.negative_embeds, sub.prompt_embeds])
                out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=emb).sample
                out.float().pow(2).mean().backward()
        unet.zero_grad(set_to_none=True)

    base = timed(bare, repeats)
    return {"phase": phase, "bare_forward_backward": base, "throughput_ratio": throughput_ratio(phase, base),
            "samples": len(batch), "steps_per_sample": n_steps}


# ------------------------------------------------------------------------------------------ weights
def bench_weights(repeats: int, sd2: bool) -> dict:
    import ray

    from loop_ray.system.roles.weights import ObjectStoreWeightSync, state_dict_bytes
    from loop_ray.toy.model import load_toy_components

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sync = ObjectStoreWeightSync()
    models = {"embedded": load_toy_components(None).unet}
    if sd2:
        from diffusers import UNet2DConditionModel

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        from gpu_check import SD2_BASE_UNET

        models["sd2_unet"] = UNet2DConditionModel(**SD2_BASE_UNET)
    def round_trip(state_dict):  # what one version costs: put on the learner, get on a sampler
        sync.fetch(sync.publish(state_dict, 1))

    out = {}
    for name, unet in models.items():
        sd = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        nbytes = state_dict_bytes(sd)
        t = timed(lambda sd=sd: round_trip(sd), repeats)
        out[name] = {"MB": nbytes / 1e6, **t, "MB_per_s": nbytes / 1e6 / t["median_s"]}
    if started:
        ray.shutdown()
    return out


# ------------------------------------------------------------------------------------------ report
def markdown(report: dict) -> str:
    lines = [f"# loop-ray bench ({report['hardware']})", "",
             "Throughput ratio: ours over the baseline's (the baseline's time ÷ ours); above 1 is faster.", "",
             "| what | ours | baseline | throughput ratio (median, range) |", "|---|---|---|---|"]
    for name, s in report.get("sampler", {}).items():
        base_key = "diffusers_pipeline" if "diffusers_pipeline" in s else "diffusers_loop"
        r = s["throughput_ratio"]
        lines.append(f"| sampler, {name} (batch {s['batch']}, {s['steps']} steps) | {s['loop_ray']['median_s']:.3f} s | "
                     f"{s[base_key]['median_s']:.3f} s ({base_key}) | {r['median']:.2f} ({r['low']:.2f}–{r['high']:.2f}) |")
    if "learner" in report:
        s, r = report["learner"], report["learner"]["throughput_ratio"]
        lines.append(f"| learner phase ({s['samples']} samples × {s['steps_per_sample']} steps) | {s['phase']['median_s']:.3f} s | "
                     f"{s['bare_forward_backward']['median_s']:.3f} s (bare fwd+bwd) | {r['median']:.2f} ({r['low']:.2f}–{r['high']:.2f}) |")
    for mode, s in report.get("end_to_end", {}).items():
        r = s["throughput_ratio"]
        lines.append(f"| one iteration, Ray {mode} | {s['ray']['median_s']:.2f} s | {s['local']['median_s']:.2f} s (one process) | "
                     f"{r['median']:.2f} ({r['low']:.2f}–{r['high']:.2f}) |")
    for name, s in report.get("weights", {}).items():
        lines.append(f"| weight publication, {name} ({s['MB']:.1f} MB) | {s['median_s']:.3f} s | – | {s['MB_per_s']:.0f} MB/s |")
    for role, mb in report.get("memory_peak_rss_mb", {}).items():
        lines.append(f"| peak RSS, {role} | {mb:.0f} MB | – | – |")
    return "\n".join(lines) + "\n"


BENCHMARKS = ("sampler", "learner", "end_to_end", "weights")


def run_bench(out: str | Path, repeats: int = 3, only: tuple[str, ...] = BENCHMARKS, batch: int = 8, steps: int = 20,
              sd2: bool = True) -> dict:
    """Run the benchmarks named in `only`, write OUT/bench.json and bench.md, return the report."""
    from loop_ray.utils import output_folder, pin_threads

    out = output_folder(out)  # fails now rather than after the benchmarks
    pin_threads(1)
    report: dict = {"hardware": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                                f"{torch.get_num_threads()} thread(s)"}
    if "sampler" in only:
        report["sampler"] = bench_sampler(repeats, batch, steps, 2.0)
    if "learner" in only:
        report["learner"] = bench_learner(repeats)
    if "end_to_end" in only:
        from loop_ray.bench_e2e import bench_end_to_end

        e2e, memory = bench_end_to_end(repeats)
        report["end_to_end"] = {mode: {**s, "throughput_ratio": throughput_ratio(s["ray"], s["local"])}
                                for mode, s in e2e.items()}
        report["memory_peak_rss_mb"] = {"driver/bench process": peak_rss_mb(), **memory}
    if "weights" in only:
        report["weights"] = bench_weights(repeats, sd2)
    (out / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(report))
    return report
