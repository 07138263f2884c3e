"""`loop-ray diagnose`: does a config's policy-gradient estimate carry a consistent direction?

Before spending GPU hours on a design (which steps are stochastic, how a group shares noise, which
weights train, which advantages), this samples one batch the way training samples its iteration
(the plan's prompts and seeds, K samples each, the config's step choice and group noise), scores it
with the config's reward and computes the config's advantages A_i (clamped to +-adv_clip_max, as
the learner does). For every prompt p it then takes the policy gradient

    g_p = sum_{i in group p} A_i grad_theta sum_{j in trained steps of i} log p_theta(step j of i)

over the trainable weights (`policy.trainable_parameters()`: model.trainable / model.freeze / LoRA),
and the same per trained step j, g_{p,j}. If the estimate points somewhere, the prompts agree:

- split-half cosine: over R random halvings of the prompts, cos(sum_{half 1} g_p, sum_{half 2} g_p);
- all-pairs ratio rho = mean_{p != q} g_p . g_q / mean_p |g_p|^2 = (|S|^2 - Q) / ((P - 1) Q), with
  S = sum_p g_p and Q = sum_p |g_p|^2: about 0 when the per-prompt gradients are unrelated, 1 when
  they are the same vector; its jackknife z-score (rho over the leave-one-prompt-out s.e.);
- rho_j and its z per trained step index j;
- the within-group reward std and the participation ratio |g|_2^4 / sum_i g_i^4 of the summed
  gradient (how many parameters carry it).

Every figure comes beside its null: the same computed with the advantages shuffled across all
samples of the batch (`apply_control(..., "shuffle")`): same magnitudes, no information about which
image was better (the config's own `algorithm.control` is ignored: both sides are always shown). Each figure is a function of Gram matrices of per-prompt vectors; the loop is
step-major, so it holds the per-prompt totals and one step's per-prompt vectors (2 x P x |theta|
floats per weighting), never P x steps x |theta|. Log-probs follow the policy's convention (averaged
over latent dimensions); every figure is scale-free. All trained steps count, as the expectation
of the learner's `timestep_fraction` subsample does.
"""

from __future__ import annotations

import math
import time

import torch

# ------------------------------------------------------------------------------------ the maths


def gram(vectors: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """G[p, q] = v_p . v_q (float64) of vectors [P, D], computed in column chunks of float64."""
    vectors = torch.as_tensor(vectors)
    if vectors.dim() != 2:
        raise ValueError(f"gram: expected vectors [P, D], got {tuple(vectors.shape)}")
    out = torch.zeros(vectors.shape[0], vectors.shape[0], dtype=torch.float64)
    for start in range(0, vectors.shape[1], chunk):
        block = vectors[:, start : start + chunk].to(torch.float64)
        out += block @ block.T
    return out


def pair_ratio(sum_sq: float, q: float, n: int) -> float:
    """rho = mean_{p != q} g_p . g_q / mean_p |g_p|^2 from |S|^2 = |sum_p g_p|^2, Q = sum_p |g_p|^2 and
    the number n of vectors: (|S|^2 - Q) / ((n - 1) Q). NaN when Q = 0 or n < 2."""
    if n < 2 or not q > 0:
        return math.nan
    return (float(sum_sq) - float(q)) / ((n - 1) * float(q))


def pair_ratio_from_gram(g: torch.Tensor) -> float:
    return pair_ratio(float(g.sum()), float(g.diagonal().sum()), g.shape[0])


def all_pairs_ratio(vectors: torch.Tensor) -> float:
    """rho of per-prompt vectors [P, D] (see `pair_ratio`)."""
    return pair_ratio_from_gram(gram(vectors))


def jackknife_from_gram(g: torch.Tensor) -> dict:
    """rho, its leave-one-out estimates rho_{-p}, the jackknife standard error
    sqrt((P - 1) / P * sum_p (rho_{-p} - mean rho_{-.})^2) and z = rho / s.e., from the Gram matrix
    [P, P] of P >= 3 vectors. s.e. 0 (every rho_{-p} equal) gives z NaN."""
    n = g.shape[0]
    if n < 3:
        raise ValueError(f"the jackknife of rho needs at least 3 prompts, got {n}")
    total, diag, rows = g.sum(), g.diagonal(), g.sum(dim=1)
    sum_sq_loo = total - 2 * rows + diag  # |S - g_p|^2
    q_loo = diag.sum() - diag
    loo = torch.tensor([pair_ratio(float(s), float(q), n - 1) for s, q in zip(sum_sq_loo, q_loo)], dtype=torch.float64)
    rho = pair_ratio_from_gram(g)
    se = math.sqrt((n - 1) / n * float(((loo - loo.mean()) ** 2).sum()))
    z = rho / se if se > 0 else math.nan
    return {"rho": rho, "se": se, "z": z, "leave_one_out": loo.tolist()}


def jackknife_pair_ratio(vectors: torch.Tensor) -> dict:
    """`jackknife_from_gram` of per-prompt vectors [P, D]."""
    return jackknife_from_gram(gram(vectors))


def split_half_cosines_from_gram(g: torch.Tensor, splits: int, generator: torch.Generator) -> torch.Tensor:
    """[splits] cosines between the sums of the two halves of a random halving of the P vectors
    (the first P // 2 of a random permutation against the rest), from their Gram matrix."""
    n = g.shape[0]
    if n < 2:
        raise ValueError(f"a split half needs at least 2 prompts, got {n}")
    out = torch.empty(splits, dtype=torch.float64)
    for r in range(splits):
        perm = torch.randperm(n, generator=generator)
        u = torch.zeros(n, dtype=torch.float64)
        u[perm[: n // 2]] = 1.0
        v = 1.0 - u
        a, b, c = u @ g @ u, v @ g @ v, u @ g @ v
        out[r] = c / math.sqrt(float(a * b)) if a > 0 and b > 0 else math.nan
    return out


def split_half_cosines(vectors: torch.Tensor, splits: int, generator: torch.Generator) -> torch.Tensor:
    """`split_half_cosines_from_gram` of per-prompt vectors [P, D]."""
    return split_half_cosines_from_gram(gram(vectors), splits, generator)


def participation_ratio(v: torch.Tensor) -> float:
    """|v|_2^4 / sum_i v_i^4: 1 when one coordinate carries v, D when all D carry it equally."""
    v = torch.as_tensor(v).to(torch.float64).flatten()
    fourth = float((v**4).sum())
    return float((v**2).sum()) ** 2 / fourth if fourth > 0 else math.nan


def within_group_std(rewards: torch.Tensor) -> float:
    """Mean over groups of the (Bessel-corrected) std of the K rewards [G, K] of a group."""
    return float(rewards.to(torch.float64).std(dim=1).mean())


def summarize(g: torch.Tensor, splits: int, generator: torch.Generator) -> dict:
    """The figures of one set of per-prompt vectors, from their Gram matrix [P, P]."""
    cos = split_half_cosines_from_gram(g, splits, generator)
    jack = jackknife_from_gram(g)
    return {
        "split_half_cosine_mean": float(cos.mean()),
        "split_half_cosine_std": float(cos.std()) if splits > 1 else 0.0,
        "rho": jack["rho"],
        "rho_se": jack["se"],
        "z": jack["z"],
        "mean_sq_norm": float(g.diagonal().mean()),
    }


# ------------------------------------------------------------------------------- the gradients


def flat_grad(value: torch.Tensor, params: list[torch.nn.Parameter], retain: bool) -> torch.Tensor:
    grads = torch.autograd.grad(value, params, retain_graph=retain, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).detach().flatten().float().cpu()
                      for g, p in zip(grads, params)])


def sample_scored(cfg, policy, reward, prompt_set, iteration: int, stat_tracker=None):
    """(batch, rewards [G, K], advantages [G, K]) of `iteration`'s plan, sampled and scored as
    training does it (loop_ray.training.sample_score, without the config's control: both sides are
    computed here), the advantages clamped to +-adv_clip_max as the learner clamps them; groups with
    an invalid reward are left out."""
    from loop_ray.training.sample_score import sample_and_score

    k, a = cfg.sampling.k, cfg.algorithm
    batch, _ = sample_and_score(cfg, policy, reward, prompt_set, iteration, stat_tracker, control="none")
    return batch, batch.rewards.view(-1, k), batch.advantages.view(-1, k).clamp(-a.adv_clip_max, a.adv_clip_max)


def per_prompt_gradients(policy, batch, k: int, steps: torch.Tensor, weightings: dict[str, torch.Tensor],
                         on_step=None, step_weights: torch.Tensor | None = None):
    """Step-major: for each trained step column c (steps [B, n]), the per-prompt gradients
    g_{p,c} = grad sum_{i in p} w_i log p(step c of i) for each weighting w [B], p running over
    consecutive groups of k rows (k = len(batch) gives one gradient of the whole batch);
    `on_step(c, {name: [P, D]})` sees them, and the per-prompt totals {name: [P, D]} (summed over
    steps) are returned. `step_weights` [T] (the config's `algorithm.step_weight`) scales each
    step's log-prob."""
    params = policy.trainable_parameters()
    dim = sum(p.numel() for p in params)
    groups = len(batch) // k
    totals = {name: torch.zeros(groups, dim) for name in weightings}
    names = list(weightings)
    for c in range(steps.shape[1]):
        current = {name: torch.empty(groups, dim) for name in weightings}
        for p in range(groups):
            rows = torch.arange(p * k, (p + 1) * k)
            logp = policy.log_prob(batch.select(rows), steps[rows, c])
            if step_weights is not None:
                logp = logp * step_weights[steps[rows, c]].to(logp.device, logp.dtype)
            for i, name in enumerate(names):
                w = weightings[name][rows].to(logp.device, logp.dtype)
                current[name][p] = flat_grad((w * logp).sum(), params, retain=i < len(names) - 1)
        for name in weightings:
            totals[name] += current[name]
        if on_step is not None:
            on_step(c, current)
    return totals


# ------------------------------------------------------------------------------------- the run


def diagnose(cfg, *, prompts: int | None = None, splits: int = 200, iteration: int = 0, device: str = "cpu",
             log=print) -> dict:
    """The whole diagnostic of one config (module docstring); returns the JSON-ready record."""
    from loop_ray.algorithms import StatTracker, apply_control, control_seed
    from loop_ray.diffusion.factory import build_policy
    from loop_ray.prompts import load_prompts
    from loop_ray.rewards.composite import CompositeReward

    t0 = time.perf_counter()
    cfg = cfg.model_copy(deep=True)
    if prompts is not None:
        cfg.sampling.prompts_per_iteration = prompts  # the learner's divisibility does not apply here
    k = cfg.sampling.k
    policy = build_policy(cfg, device)
    reward = CompositeReward.from_config(cfg.reward)
    batch, rewards, advantages = sample_scored(cfg, policy, reward, load_prompts(cfg.prompts.train), iteration,
                                               StatTracker.for_algorithm(cfg.algorithm))
    num_prompts = rewards.shape[0]
    if num_prompts < 3:
        raise ValueError(f"{num_prompts} prompts with a valid reward: the diagnostic needs at least 3")
    shuffled = apply_control(advantages, "shuffle", torch.Generator().manual_seed(control_seed(cfg.seed, iteration)))
    weightings = {"true": advantages.flatten(), "shuffled": shuffled.flatten()}
    a = cfg.algorithm
    steps = policy.trainable_steps_of(batch, a.skip_first_steps, a.skip_last_steps)  # [B, n]
    if not (steps == steps[:1]).all():
        raise ValueError("the samples of the batch train different steps; the diagnostic needs one step set")
    step_list = steps[0].tolist()
    t1 = time.perf_counter()
    log(f"sampled and scored {len(batch)} images ({num_prompts} prompts x K={k}) in {t1 - t0:.0f} s; "
        f"gradients over {len(step_list)} steps x {num_prompts} prompts ...")

    per_step: list[dict] = []

    def on_step(c: int, current: dict[str, torch.Tensor]) -> None:
        j = step_list[c]
        row = {"step": j, "timestep": int(policy.timesteps[j]), "sigma": float(policy.sigmas[j])}
        for name, vectors in current.items():
            g = gram(vectors)
            jack = jackknife_from_gram(g)
            row[name] = {"rho": jack["rho"], "z": jack["z"], "sum_sq_norm": float(g.diagonal().sum()),
                         "sum_norm_sq": float(g.sum())}
        per_step.append(row)
        log(f"  step {j}: rho {row['true']['rho']:+.4f} (null {row['shuffled']['rho']:+.4f}), "
            f"{time.perf_counter() - t1:.0f} s")

    from loop_ray.training.update import policy_step_weights

    totals = per_prompt_gradients(policy, batch, k, steps, weightings, on_step,
                                  policy_step_weights(policy, steps, a.step_weight))
    t2 = time.perf_counter()
    splits_gen = torch.Generator().manual_seed(control_seed(cfg.seed, iteration) + 1)
    total = {}
    for name, vectors in totals.items():
        g = gram(vectors)
        total[name] = summarize(g, splits, splits_gen)
        total[name]["participation_ratio"] = participation_ratio(vectors.sum(dim=0))
    for name in weightings:  # each step's share of sum_p |g_{p,j}|^2
        q_all = sum(r[name]["sum_sq_norm"] for r in per_step)
        for r in per_step:
            r[name]["share"] = r[name]["sum_sq_norm"] / q_all if q_all > 0 else math.nan
    return {
        "settings": {
            "prompts": num_prompts, "k": k, "iteration": iteration, "splits": splits,
            "sde_steps": batch.sde_mask[0].nonzero().flatten().tolist() if batch.sde_mask is not None else None,
            "group_noise": cfg.sampling.group_noise, "num_steps": cfg.sampling.num_steps,
            "trained_steps": step_list, "advantage": a.advantage, "reward": [t.name for t in cfg.reward.terms],
            "trainable_parameters": sum(p.numel() for p in policy.trainable_parameters()),
            "model": cfg.model.path or cfg.model.kind, "trainable": cfg.model.trainable, "freeze": cfg.model.freeze,
            "lora_rank": cfg.model.lora_rank,
        },
        "reward": {"mean": float(rewards.mean()), "within_group_std": within_group_std(rewards)},
        "total": total,
        "per_step": per_step,
        "seconds": {"sample": t1 - t0, "gradients": t2 - t1, "total": time.perf_counter() - t0},
    }


def _f(x: float, spec: str = "+.3f") -> str:
    return "nan" if x is None or not math.isfinite(x) else format(x, spec)


def format_report(result: dict, name: str = "") -> str:
    s, r, tot = result["settings"], result["reward"], result["total"]
    sde = "all" if s["sde_steps"] is None or len(s["sde_steps"]) == s["num_steps"] else s["sde_steps"]
    lines = [
        f"gradient-signal diagnostic {name}".rstrip(),
        (f"  {s['prompts']} prompts x K={s['k']}, iteration {s['iteration']}'s plan; stochastic steps {sde}, "
         f"group_noise {s['group_noise']}; trained steps {s['trained_steps']}"),
        (f"  {s['trainable_parameters']:,} trainable parameters; advantage {s['advantage']}; reward "
         f"{'+'.join(s['reward'])} mean {r['mean']:.3f}, within-group std {r['within_group_std']:.4f}"),
        "",
        f"  {'total gradient':<26}{'true':>18}{'shuffled (null)':>20}",
    ]
    t, n = tot["true"], tot["shuffled"]
    rows = [
        ("split-half cosine", f"{_f(t['split_half_cosine_mean'])} ± {_f(t['split_half_cosine_std'], '.3f')}",
         f"{_f(n['split_half_cosine_mean'])} ± {_f(n['split_half_cosine_std'], '.3f')}"),
        ("all-pairs rho", _f(t["rho"], "+.4f"), _f(n["rho"], "+.4f")),
        ("jackknife z of rho", _f(t["z"], "+.2f"), _f(n["z"], "+.2f")),
        ("participation ratio", _f(t["participation_ratio"], ",.0f"), _f(n["participation_ratio"], ",.0f")),
    ]
    lines += [f"  {a:<26}{b:>18}{c:>20}" for a, b, c in rows]
    header = f"  {'step':>4} {'t':>4} {'sigma':>7} {'share':>6} {'rho':>8} {'z':>6}   {'rho null':>8} {'z null':>6}"
    lines += ["", header]
    for row in result["per_step"]:
        tr, nu = row["true"], row["shuffled"]
        flag = "  *" if math.isfinite(tr["z"]) and tr["z"] >= 3 else ""
        lines.append(
            f"  {row['step']:>4} {row['timestep']:>4} {row['sigma']:>7.4f} {_f(tr['share'], '.3f'):>6} "
            f"{_f(tr['rho'], '+.4f'):>8} {_f(tr['z'], '+.2f'):>6}   {_f(nu['rho'], '+.4f'):>8} {_f(nu['z'], '+.2f'):>6}{flag}"
        )
    lines.append("  (share: the step's part of sum_p |g_p,j|^2; * z >= 3: the prompts agree on a direction)")
    return "\n".join(lines)


def json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
