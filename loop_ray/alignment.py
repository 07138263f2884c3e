"""A known-good direction in weight space, and how well a policy-gradient estimate points along it.

Guidance distillation (the first stage of Meng et al. 2023, "On Distillation of Guided Diffusion
Models", arXiv 2210.03142, eq. 5) trains a student eps_theta(x_t, t, c) to match the guided teacher

    eps_hat(x_t, t, c) = eps_0(x_t, t, "") + w * (eps_0(x_t, t, c) - eps_0(x_t, t, ""))

by least squares, E ||eps_theta(x_t, t, c) - eps_hat(x_t, t, c)||^2. Here the states x_t come from
the student's own trajectories (resampled every round), the teacher is the frozen starting policy
with guidance w, and only the policy's trainable parameters move (the same subset RL trains). On
the embedded world, guidance raises the binding reward, so the parameter change this regression
makes, d = theta_distilled - theta_0, is a direction in which a reward gain is known to lie.

An RL design's update direction is its policy-gradient estimate summed over N images,

    g_N = sum_{i <= N} sum_{j in trained steps} w_j A_i grad_theta log p_theta(x_{j+1}^i | x_j^i)

(w_j the design's per-step loss weight), whose cosine with d says how far a step along g_N moves
the policy toward what guidance gives. A direction unrelated to d has cosine ~ N(0, 1/|theta|);
the same estimate with the advantages shuffled across the batch (no information about which image
was better) is the null every figure is read against.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch

from loop_ray.trajectory import TrajectoryBatch


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """a . b / (|a| |b|) in float64; NaN when either vector is zero."""
    a, b = a.to(torch.float64).flatten(), b.to(torch.float64).flatten()
    denom = a.norm() * b.norm()
    return float(a @ b / denom) if denom > 0 else float("nan")


def flat_parameters(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The parameters as one float32 CPU vector (detached), in the order given."""
    return torch.cat([p.detach().float().flatten().cpu() for p in params])


def parameter_blocks(named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, slice]:
    """{block: index ranges} of the flat parameter vector of `named` (in that order): one entry per
    top-level block of the network (`down_blocks.1`, `mid_block`, `up_blocks.0`, `conv_out`, ...)
    and `cross_attention` for every parameter of diffusers' text cross-attention (`attn2`)."""
    blocks: dict[str, list[slice]] = {}
    start = 0
    for name, p in named:
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
        span = slice(start, start + p.numel())
        blocks.setdefault(key, []).append(span)
        if ".attn2." in f".{name}":
            blocks.setdefault("cross_attention", []).append(span)
        start += p.numel()
    return blocks


def restricted(v: torch.Tensor, spans: list[slice]) -> torch.Tensor:
    return torch.cat([v[s] for s in spans])


def teacher_of(policy, guidance_scale: float):
    """A frozen copy of `policy` that samples and predicts with classifier-free guidance w. Only the
    network is copied; the text encoder, tokenizer and scheduler (never trained) are shared."""
    teacher = copy.copy(policy)
    teacher.unet = copy.deepcopy(policy.unet)
    for p in teacher.unet.parameters():
        p.requires_grad_(False)
    teacher.unet.eval()
    teacher.guidance_scale = float(guidance_scale)
    return teacher


def distillation_loss(student, teacher, batch: TrajectoryBatch, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's output and the guided teacher's at the stored
    states x_j of samples `rows` [M] at step indices `steps` [M] (eq. 5 of Meng et al.)."""
    x_t = batch.latents[rows, steps]
    cond = {name: v[rows] for name, v in batch.conditioning().items()}
    with torch.no_grad():
        target = teacher.model_output(x_t, steps, cond)
    prediction = student.model_output(x_t, steps, cond)
    return torch.nn.functional.mse_loss(prediction, target)


def distill_guidance(
    policy,
    guidance_scale: float,
    sample_round: Callable[[int], TrajectoryBatch],
    *,
    rounds: int,
    lr: float,
    minibatch: int,
    generator: torch.Generator,
    log: Callable[[str], None] = lambda _msg: None,
    keep: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, g): d = theta_after - theta_before of `rounds` rounds of guidance distillation on the
    policy's trainable parameters (Adam, `lr`), and g = -grad of the regression loss at theta_before
    over the first round's states (the distillation's own steepest-descent direction, comparable
    with a gradient where d is Adam's per-weight rescaled path). Each round samples a batch with the
    current student (`sample_round(r)`) and takes one pass over all its (sample, step) states in
    shuffled minibatches. The policy's weights are restored before returning unless `keep`."""
    params = policy.trainable_parameters()
    before = [p.detach().clone() for p in params]
    teacher = teacher_of(policy, guidance_scale)
    optimizer = torch.optim.Adam(params, lr=lr)
    gradient = torch.zeros(sum(p.numel() for p in params))
    try:
        for r in range(rounds):
            batch = sample_round(r)
            size, steps = len(batch), batch.num_steps
            if r == 0:
                for first in range(0, size, max(1, minibatch // steps)):
                    rows = torch.arange(first, min(first + max(1, minibatch // steps), size)).repeat_interleave(steps)
                    at = torch.arange(steps).repeat(len(rows) // steps)
                    loss = distillation_loss(policy, teacher, batch, rows, at) * len(rows) / (size * steps)
                    grads = torch.autograd.grad(loss, params)
                    gradient -= torch.cat([g.detach().float().flatten().cpu() for g in grads])
            order = torch.randperm(size * steps, generator=generator)
            losses = []
            for first in range(0, len(order), minibatch):
                pick = order[first : first + minibatch]
                loss = distillation_loss(policy, teacher, batch, pick // steps, pick % steps)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            log(f"  distillation round {r + 1}/{rounds}: loss {sum(losses) / len(losses):.5f}")
        return torch.cat([(p.detach() - b).float().flatten().cpu() for p, b in zip(params, before)]), gradient
    finally:
        if not keep:
            with torch.no_grad():
                for p, b in zip(params, before):
                    p.copy_(b)


# ------------------------------------------------------------------------------- the runs


def distillation_rounds(cfg, policy, images_per_round: int) -> Callable[[int], TrajectoryBatch]:
    """`sample_round(r)` for `distill_guidance`: `images_per_round` samples of the train prompts from
    the plan of iteration 10^6 + r (apart from any training iteration's), eta = 1 at every step,
    independent noise, drawn with the policy's current weights."""
    from loop_ray.prompts import load_prompts
    from loop_ray.training.plan import plan_iteration

    k = cfg.sampling.k
    if images_per_round % k:
        raise ValueError(f"images_per_round={images_per_round} must be a multiple of sampling.k={k}")
    prompt_set = load_prompts(cfg.prompts.train)
    plan_cfg = cfg.model_copy(deep=True)
    plan_cfg.sampling.prompts_per_iteration = images_per_round // k

    def sample_round(r: int) -> TrajectoryBatch:
        plan = plan_iteration(plan_cfg, prompt_set, 1_000_000 + r)
        with torch.no_grad():
            return policy.sample(plan.prompts, k, plan.seeds, batch_size=cfg.sampling.batch_size, version=0,
                                 group_noise="independent")

    return sample_round


def guidance_direction(cfg, *, guidance_scale: float = 2.0, rounds: int = 8, images_per_round: int = 256,
                       lr: float = 1e-4, minibatch: int = 64, device: str = "cpu", log=print) -> dict:
    """d of `distill_guidance` for the config's model and trainable subset, the states sampled by
    `distillation_rounds`. Returns {"direction": d, "settings": {...}}."""
    from loop_ray.diffusion.factory import build_policy

    policy = build_policy(cfg, device)
    sample_round = distillation_rounds(cfg, policy, images_per_round)
    generator = torch.Generator().manual_seed(cfg.seed)
    direction, gradient = distill_guidance(policy, guidance_scale, sample_round, rounds=rounds, lr=lr, minibatch=minibatch,
                                 generator=generator, log=log)
    if not float(direction.norm()) > 0:
        raise ValueError(f"guidance distillation moved no weight: the teacher (guidance {guidance_scale}) predicts "
                         f"what the student (sampling.guidance_scale {cfg.sampling.guidance_scale}) does")
    settings = {"guidance_scale": guidance_scale, "rounds": rounds, "images_per_round": images_per_round,
                "lr": lr, "minibatch": minibatch, "model": cfg.model.path or cfg.model.kind,
                "trainable": cfg.model.trainable, "freeze": list(cfg.model.freeze), "lora_rank": cfg.model.lora_rank,
                "parameters": int(direction.numel()), "norm": float(direction.norm())}
    settings["gradient_norm"] = float(gradient.norm())
    return {"direction": direction, "gradient": gradient, "settings": settings}


def align(cfg, directions: dict[str, torch.Tensor], *, images: int = 512, every: int = 32, nulls: int = 2,
          device: str = "cpu", log=print) -> dict:
    """cos(g_N, d) of the config's policy-gradient estimate g_N (module docstring) with each
    reference direction d of `directions`, after every `every` images up to `images`, beside
    `nulls` shuffled-advantage nulls; per trained step and per network block at the end. The policy
    stays at its starting weights: g_N is the estimate at theta_0 from iterations 0, 1, ... of the
    config's own plan (prompts, seeds, stochastic steps, group noise, advantages clamped as the
    learner does, `algorithm.step_weight`)."""
    from loop_ray.algorithms import StatTracker, apply_control, control_seed
    from loop_ray.diagnose import per_prompt_gradients, sample_scored
    from loop_ray.diffusion.factory import build_policy
    from loop_ray.prompts import load_prompts
    from loop_ray.rewards.composite import CompositeReward
    from loop_ray.training.update import policy_step_weights

    k = cfg.sampling.k
    if every % k:
        raise ValueError(f"every={every} must be a multiple of sampling.k={k}")
    policy = build_policy(cfg, device)
    named = [(n, p) for n, p in policy.unet.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    dim = sum(p.numel() for p in params)
    for ref, d in directions.items():
        if d.numel() != dim:
            raise ValueError(f"the direction {ref!r} has {d.numel()} parameters, the config trains {dim}: compute it "
                             "with the same model.trainable / model.freeze / model.lora_rank")
        if not float(d.norm()) > 0:
            raise ValueError(f"the direction {ref!r} is zero: there is nothing to align with")
    reward = CompositeReward.from_config(cfg.reward)
    prompt_set, tracker = load_prompts(cfg.prompts.train), StatTracker.for_algorithm(cfg.algorithm)
    names = ["true"] + [f"null{i}" for i in range(nulls)]
    total = {n: torch.zeros(dim) for n in names}
    per_step: dict[int, dict[str, torch.Tensor]] = {}

    def cosines(vectors: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        return {ref: {n: cosine(v, d) for n, v in vectors.items()} for ref, d in directions.items()}

    curve, seen, iteration, t0 = [], 0, 0, time.perf_counter()
    while seen < images:
        batch, _, advantages = sample_scored(cfg, policy, reward, prompt_set, iteration, tracker)
        weights = {"true": advantages.flatten()}
        for i in range(nulls):
            gen = torch.Generator().manual_seed(control_seed(cfg.seed, iteration) + i)
            weights[f"null{i}"] = apply_control(advantages, "shuffle", gen).flatten()
        steps = policy.trainable_steps_of(batch, cfg.algorithm.skip_first_steps, cfg.algorithm.skip_last_steps)
        step_w = policy_step_weights(policy, steps, cfg.algorithm.step_weight)
        for first in range(0, len(batch), every):
            if seen >= images:
                break
            rows = torch.arange(first, min(first + every, len(batch)))
            chunk_steps = steps[rows]

            def add_step(c: int, current: dict[str, torch.Tensor], chunk_steps=chunk_steps) -> None:
                j = int(chunk_steps[0, c])
                for n in names:
                    per_step.setdefault(j, {m: torch.zeros(dim) for m in names})[n] += current[n][0]

            sums = per_prompt_gradients(policy, batch.select(rows), len(rows), chunk_steps,
                                        {n: weights[n][rows] for n in names}, add_step, step_w)
            for n in names:
                total[n] += sums[n][0]
            seen += len(rows)
            point = {"images": seen, **cosines(total)}
            curve.append(point)
            log(f"  {seen:>6} images: " + "; ".join(
                f"{ref} true {c['true']:+.4f} nulls " + " ".join(f"{c[n]:+.4f}" for n in names[1:])
                for ref, c in point.items() if ref != "images") + f"  ({time.perf_counter() - t0:.0f} s)")
        iteration += 1
    blocks = parameter_blocks(named)
    by_block = {}
    for block, spans in blocks.items():
        sub = {ref: restricted(d, spans) for ref, d in directions.items()}
        by_block[block] = {"parameters": int(sum(sp.stop - sp.start for sp in spans)),
                           **{ref: {"share": float(sub[ref].double().pow(2).sum() / d.double().pow(2).sum()),
                                    **{n: cosine(restricted(total[n], spans), sub[ref]) for n in names}}
                              for ref, d in directions.items()}}
    sq = {j: float(v["true"].double().pow(2).sum()) for j, v in per_step.items()}
    steps_out = [{"step": j, "sigma": float(policy.sigmas[j]), "share": sq[j] / sum(sq.values()), **cosines(v)}
                 for j, v in sorted(per_step.items())]
    return {"curve": curve, "per_step": steps_out, "per_block": by_block, "random_cosine_scale": dim ** -0.5,
            "parameters": dim, "images": seen, "seconds": time.perf_counter() - t0, "estimates": names,
            "gradient_norm": {n: float(total[n].norm()) for n in names}}


def format_alignment(result: dict, name: str = "") -> str:
    """The alignment figures as a text report: one column per (reference direction, estimate)."""
    names = result["estimates"]
    refs = [r for r in result["curve"][-1] if r != "images"]
    cols = [(ref, n) for ref in refs for n in names]
    head = " ".join(f"{(ref[:8] + ':' + n)[:15]:>15}" for ref, n in cols)

    def row(d: dict) -> str:
        return " ".join(f"{d[ref][n]:>+15.4f}" for ref, n in cols)

    scale = (f"  {result['parameters']:,} trainable parameters; a random direction's cosine ~ "
             f"+-{result['random_cosine_scale']:.4f}")
    lines = [f"alignment with guidance distillation {name}".rstrip(), scale, "", f"  {'images':>7} {head}"]
    pts = result["curve"]
    for i in sorted({max(1, len(pts) * q // 8) - 1 for q in range(1, 9)}):
        lines.append(f"  {pts[i]['images']:>7} {row(pts[i])}")
    lines += ["", f"  {'step':>4} {'sigma':>7} {'share':>6} {head}"]
    for r in result["per_step"]:
        lines.append(f"  {r['step']:>4} {r['sigma']:>7.4f} {r['share']:>6.3f} {row(r)}")
    lines += ["", f"  {'block':<16} {'params':>8} {'|d|^2':>6} {head}"]
    for block, r in result["per_block"].items():
        lines.append(f"  {block:<16} {r['parameters']:>8,} {r[refs[0]]['share']:>6.3f} {row(r)}")
    lines.append(f"  (|d|^2: the block's share of the squared norm of {refs[0]!r})")
    return "\n".join(lines)
