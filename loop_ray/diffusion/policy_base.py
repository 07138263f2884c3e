"""What every text-to-image policy shares, whatever its sampler: the RL side of a denoising chain.

A policy pi_theta is a chain of T Gaussian transitions, one per sampler step j = 0..T-1, from
latents[:, j] to latents[:, j+1] (latents[:, 0] is pure noise, latents[:, T] the sample; in DDPM's
notation x_T -> ... -> x_0). A subclass supplies the model
(the network call with its guidance) and one transition with its log-prob (`DDIMPolicy`:
DDIM; a flow policy: the SDE form of the flow ODE). This base owns the rest:

- `sample`: K trajectories per prompt with per-sample seeds, the behaviour log-probs logp_old stored;
- which steps are stochastic (`sde_steps`): all of them (the paper), or a subset such as a window
  of W consecutive steps; the others run deterministically (eta = 0), store log-prob 0 and are never
  trained (as in MixGRPO's sliding window and Flow-GRPO's fast variant);
- how the K samples of a group share noise (`group_noise`):
    independent  every sample has its own x_0 and noise (the paper);
    branch       the K samples share the initial noise and the deterministic prefix, computed once per group,
                 and part at the first stochastic step (TempFlow-GRPO, Flow-GRPO-Fast);
    shared       every step stays stochastic (each sample is an exact sample of the policy), but
                 the K samples share the initial noise and the noise of every step outside `sde_steps`; only the
                 noise of the trained steps differs, so reward differences within a group come
                 from them, and the leave-one-out baseline of sample i depends only on the other
                 samples' trained-step noise, which is independent of sample i's (unbiased).
    antithetic   as shared, and the K samples form K/2 mirrored pairs (samples 2m, 2m+1 of the group):
                 the second of a pair draws the first's noise at the trained steps with its sign
                 flipped (mirrored sampling of evolution strategies). Each sample is still an exact
                 sample of the policy. At the first trained step, with leave-one-out advantages,
                 E[sum_i A_i grad log p_i] = K/(K-1) times the policy gradient (the partner's reward
                 enters sample i's baseline with the opposite noise): the same direction, without
                 the part of the reward that is even in the noise, which only adds variance.
- `log_prob`: the log-prob of stored transitions under the current weights, with autograd;
- `trainable_steps_of`: per sample, the stochastic steps the learner may train on;
- the trainable weights a sampler needs from the learner.

Seeds: sample i's own noise comes from a torch.Generator seeded with seeds[i]; the noise a group
shares comes from one seeded with the seed of the group's first sample. Each row draws from its own
generators, so a sample depends only on (prompt, seeds, weights), not on which samples share its
batch or on `batch_size`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import Literal

import torch

from loop_ray.diffusion.gaussian import draw_noise
from loop_ray.diffusion.kinds import GROUP_NOISE
from loop_ray.trajectory import TrajectoryBatch

_SEED_HIGH = 2**62  # seeds are drawn from [0, 2^62): they fit int64 tensors and torch.Generator

GroupNoise = Literal["independent", "branch", "shared", "antithetic"]


class PolicyBase:
    """The RL interface of a denoising policy; see the module docstring.

    Attributes a subclass sets: `unet` (the trainable denoiser network: a UNet, or a flow
    transformer; a DeepSpeed engine wrapping it can take its place, so it is reached through
    `_module()`), `device`, `num_steps`, `eta` (the noise scale of stochastic steps), `sigmas`
    ([T] float64: the std of each step at that scale, 0 where a step is deterministic anyway),
    `sample_dtype`. Methods it implements: `_conditioning`, `_model_output`, `_transition`,
    `_latent_shape`, `decode`.
    """

    unet: torch.nn.Module
    device: torch.device
    num_steps: int
    eta: float
    sigmas: torch.Tensor
    sample_dtype: torch.dtype

    def _init_seed_stream(self, seed: int | None) -> None:
        """`seed` seeds the stream that invents per-sample seeds when `sample` gets none; None seeds
        it from OS entropy, so two samplers never repeat each other."""
        self._seed_stream = torch.Generator()
        if seed is None:
            self._seed_stream.seed()
        else:
            self._seed_stream.manual_seed(seed)

    # ------------------------------------------------------------------------- subclass hooks
    def _conditioning(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-prompt conditioning tensors [N, ...] (float32, CPU) keyed by TrajectoryBatch field."""
        raise NotImplementedError

    def _model_output(self, x: torch.Tensor, steps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The guided network output at x [B, ...] for step indices `steps` [B] (at least float32)."""
        raise NotImplementedError

    def _transition(
        self,
        steps: torch.Tensor,
        model_output: torch.Tensor,
        x: torch.Tensor,
        eta: float,
        *,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One transition of step indices `steps` [B] with noise scale `eta`: draws the next x from
        `noise` (or scores the given `prev_sample`) and returns (next x, log-prob [B])."""
        raise NotImplementedError

    def _latent_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _module(self) -> torch.nn.Module:
        """The network itself, also when `self.unet` is a wrapper (DeepSpeed engine, DDP) with `.module`."""
        return getattr(self.unet, "module", self.unet)

    def model_output(self, x: torch.Tensor, step_indices: torch.Tensor, conditioning: dict[str, torch.Tensor]):
        """The (guided, with this policy's guidance scale) network output at x [B, ...] for step
        indices [B] and conditioning tensors keyed as `TrajectoryBatch.conditioning()` gives them."""
        return self._model_output(x, torch.as_tensor(step_indices, dtype=torch.long), conditioning)

    @torch.no_grad()
    def reference_output(self, x: torch.Tensor, step_indices: torch.Tensor, conditioning: dict[str, torch.Tensor]):
        """`model_output` of the reference policy kept by `keep_reference` (no gradient)."""
        with self._reference_network():
            return self.model_output(x, step_indices, conditioning)

    @torch.no_grad()
    def mean_gain(self, step_indices) -> torch.Tensor:
        """g_j = d mu_j / d (network output) of each step j [n] (float64): the transition mean is
        affine in the network output (DDIM eq. 12 for epsilon- and v-prediction without x_0
        clipping; the flow SDE and CPS steps), so g_j = mu_j(x = 0, output = 1) - mu_j(x = 0,
        output = 0), read off the policy's own transition with zero noise."""
        steps = torch.as_tensor(step_indices, dtype=torch.long).reshape(-1)
        shape = (len(steps), 1)
        zeros = torch.zeros(shape, dtype=torch.float64, device=self.device)
        ones = torch.ones(shape, dtype=torch.float64, device=self.device)
        mu_1, _ = self._transition(steps, ones, zeros, self.eta, noise=zeros)
        mu_0, _ = self._transition(steps, zeros, zeros, self.eta, noise=zeros)
        return (mu_1 - mu_0).reshape(-1).cpu()

    # ------------------------------------------------------------------------------ step sets
    def sde_mask(self, sde_steps: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """[T] bool: the stochastic steps, all of them for None; an index outside 0..T-1 is an error."""
        mask = torch.zeros(self.num_steps, dtype=torch.bool)
        if sde_steps is None:
            mask[:] = True
            return mask
        idx = torch.as_tensor(sde_steps, dtype=torch.long).reshape(-1)
        if idx.numel() == 0 or idx.min() < 0 or idx.max() >= self.num_steps:
            raise ValueError(f"sde_steps {idx.tolist()}: expected step indices in 0..{self.num_steps - 1}")
        mask[idx] = True
        return mask

    def trainable_steps(self, skip_first: int = 0, skip_last: int = 0, sde_steps=None) -> torch.Tensor:
        """The step indices the learner trains on: the stochastic steps (all, or `sde_steps`) less the
        first `skip_first` and the last `skip_last` of them, and less any whose sigma is 0 (the first
        step's gradient can be meaningless when abar ~ 0, the last step's tiny sigma can dominate
        ratios). With all steps stochastic the skips count schedule steps."""
        window = self.sde_mask(sde_steps).nonzero().flatten()
        window = window[skip_first : len(window) - skip_last]
        return window[self.sigmas[window] > 0]

    def trainable_steps_of(self, batch: TrajectoryBatch, skip_first: int = 0, skip_last: int = 0) -> torch.Tensor:
        """[B, n]: each sample's trainable steps (`trainable_steps` of its own `sde_mask`); every
        sample must have the same number n (a window has a fixed size)."""
        masks = batch.sde_mask if batch.sde_mask is not None else self.sde_mask().expand(len(batch), -1)
        unique, inverse = torch.unique(masks, dim=0, return_inverse=True)
        per_mask = [self.trainable_steps(skip_first, skip_last, m.nonzero().flatten()) for m in unique]
        if len({len(s) for s in per_mask}) > 1:
            raise ValueError(f"samples of one batch have different numbers of trainable steps: {per_mask}")
        return torch.stack(per_mask)[inverse]

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
        sde_steps: Sequence[int] | torch.Tensor | None = None,
        group_noise: GroupNoise = "independent",
        clean_only: bool = False,
    ) -> TrajectoryBatch:
        """K trajectories per prompt: B = len(prompts) * K samples, the K of prompt i contiguous.

        seeds [B]: per-sample seeds (module docstring); None draws B seeds from the seed stream.
        prompt_ids / group_ids: one per prompt (repeated K times) or one per sample; defaults are
        the prompt's index in `prompts`, so the K samples of a prompt form one leave-one-out group.
        sde_steps: the stochastic step indices (None: all); group_noise: see the module docstring.
        Runs without autograd in chunks of `batch_size` samples (default: all at once), under
        autocast to `sample_dtype` on a GPU; log-probs are float32. Tensors come back on the CPU.
        clean_only: keep only the clean samples x_0 (latents [B, 1, ...], log_probs [B, 0]), the
        record of the forward-process objectives (loop_ray.forward_process), small on the wire.
        """
        if group_noise not in GROUP_NOISE:
            raise ValueError(f"group_noise={group_noise!r}: expected one of {GROUP_NOISE}")
        num_prompts, total = len(prompts), len(prompts) * k
        if seeds is None:
            seeds = torch.randint(0, _SEED_HIGH, (total,), generator=self._seed_stream)
        seeds = torch.as_tensor(seeds, dtype=torch.long).reshape(-1)
        if seeds.numel() != total:
            raise ValueError(f"{seeds.numel()} seeds for {num_prompts} prompts x k={k} = {total} samples")
        group_seeds = seeds.view(num_prompts, k)[:, :1].expand(num_prompts, k).reshape(-1)
        noise_seeds, signs = seeds, None
        if group_noise == "antithetic":
            if k % 2:
                raise ValueError(f"group_noise='antithetic' pairs the K samples of a group: k={k} must be even")
            noise_seeds = seeds.view(num_prompts, k // 2, 2)[:, :, :1].expand(num_prompts, k // 2, 2).reshape(-1)
            signs = torch.tensor([1.0, -1.0]).repeat(total // 2)
        groups = torch.arange(total) // k  # the K samples of prompt i are rows i*K .. i*K+K-1
        default_ids = torch.arange(num_prompts)
        prompt_ids = _per_sample(prompt_ids if prompt_ids is not None else default_ids, num_prompts, k, "prompt_ids")
        group_ids = _per_sample(group_ids if group_ids is not None else default_ids, num_prompts, k, "group_ids")
        cond = {name: v.repeat_interleave(k, dim=0) for name, v in self._conditioning(prompts).items()}
        mask = self.sde_mask(sde_steps)

        chunk = batch_size or total
        latents, log_probs, images = [], [], []
        for start in range(0, total, chunk):
            rows = slice(start, min(start + chunk, total))
            x, logp, img = self._sample_chunk(
                {n: v[rows] for n, v in cond.items()}, noise_seeds[rows], group_seeds[rows], groups[rows], mask,
                group_noise, None if signs is None else signs[rows],
            )
            latents.append(x[:, -1:] if clean_only else x)
            log_probs.append(logp[:, :0] if clean_only else logp)
            images.append(img)
        return TrajectoryBatch(
            prompts=[p for p in prompts for _ in range(k)],
            prompt_ids=prompt_ids,
            group_ids=group_ids,
            seeds=seeds,
            latents=torch.cat(latents),
            timesteps=self.timesteps.expand(total, -1).clone(),
            log_probs=torch.cat(log_probs),
            images=torch.cat(images),
            version=version,
            sde_mask=mask.expand(total, -1).clone(),
            **cond,
        )

    @torch.no_grad()
    def _sample_chunk(self, cond, seeds, group_seeds, groups, mask, group_noise, signs=None):
        """One chunk: initial noise ~ N(0, I), then T transitions; returns latents [b, T+1, ...], logp_old
        [b, T] and uint8 images, all on the CPU. `seeds` seed each row's own noise; `signs` [b] (the
        antithetic pairs) multiply it."""
        own = [torch.Generator().manual_seed(int(s)) for s in seeds]
        shared = [torch.Generator().manual_seed(int(s)) for s in group_seeds] if group_noise != "independent" else own
        shape = (len(seeds), *self._latent_shape())
        x = draw_noise(shape, shared, self.device)
        first = int(mask.nonzero()[0])  # the first stochastic step: where a branched group parts
        every_step_stochastic = group_noise in ("shared", "antithetic")  # the group's noise outside sde_steps
        sign = None if signs is None else signs.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))
        trajectory, log_probs = [x], []
        use_autocast = self.device.type == "cuda" and self.sample_dtype != torch.float32
        with torch.autocast(self.device.type, dtype=self.sample_dtype, enabled=use_autocast):
            if group_noise == "branch" and first > 0:
                x, prefix = self._shared_prefix(x, cond, groups, first, own)
                trajectory += prefix
                log_probs += [torch.zeros(len(seeds))] * first
            for j in range(len(trajectory) - 1, self.num_steps):
                z = draw_noise(shape, own, self.device)
                if sign is not None:
                    z = z * sign
                if every_step_stochastic:  # both streams advance every step; outside sde_steps the group's is used
                    z_group = draw_noise(shape, shared, self.device)
                    z = z if mask[j] else z_group
                eta = self.eta if (mask[j] or every_step_stochastic) else 0.0
                steps = torch.full((len(seeds),), j, dtype=torch.long)
                out = self._model_output(x, steps, cond)
                x, logp = self._transition(steps, out, x, eta, noise=z)
                trajectory.append(x)
                log_probs.append(logp.float())
            images = self.decode(x)
        latents = torch.stack(trajectory, dim=1).float().cpu()
        return latents, torch.stack(log_probs, dim=1).cpu(), images

    def _shared_prefix(self, x, cond, groups, first, own):
        """Branching: the deterministic steps before `first`, computed once per group (the rows of a
        group share the initial noise and the conditioning, hence the whole prefix) and copied to its
        K rows. Each row's own generator still advances one draw per step, as in an unbranched run."""
        _, rep, inverse = _first_of_each(groups)
        xs, sub = [], {n: v[rep] for n, v in cond.items()}
        h = x[rep]
        for j in range(first):
            draw_noise(x.shape, own, self.device)
            steps = torch.full((len(rep),), j, dtype=torch.long)
            h, _ = self._transition(steps, self._model_output(h, steps, sub), h, 0.0, noise=torch.zeros_like(h))
            xs.append(h[inverse])
        return xs[-1], xs

    # ------------------------------------------------------------------------------- learning
    parametrisation: str  # what the network outputs (loop_ray.forward_process.PARAMETRISATIONS)

    def forward_coefficients(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) [n] float64 of the forward process x_t = alpha x_0 + sigma eps at the noise
        level of sampler step indices `steps`, the input level of `_model_output` at those steps."""
        raise NotImplementedError

    def log_prob(self, batch: TrajectoryBatch, step_indices: torch.Tensor) -> torch.Tensor:
        """log p_theta(latents[:, j+1] | latents[:, j]) of stored transitions, with autograd.

        step_indices: [B] (one step j per sample) -> [B], or [B, n] -> [B, n]. Uses the batch's
        conditioning, this policy's eta and guidance and the current weights; with unchanged weights
        it reproduces batch.log_probs at the stochastic steps (ratio 1). Deterministic steps give 0.
        """
        if batch.num_steps != self.num_steps:
            raise ValueError(f"batch has {batch.num_steps} steps, the policy {self.num_steps}")
        idx = torch.as_tensor(step_indices, dtype=torch.long).to(batch.latents.device)
        one_per_sample = idx.dim() == 1
        if one_per_sample:
            idx = idx[:, None]
        size, n = idx.shape
        if size != len(batch):
            raise ValueError(f"step_indices has {size} rows for a batch of {len(batch)}")
        logp, _ = self._score_stored(batch, idx)
        logp = logp.view(size, n)
        return logp[:, 0] if one_per_sample else logp

    def _stored_transitions(self, batch: TrajectoryBatch, idx: torch.Tensor):
        """(x_t, x_{t-1}, step indices, conditioning) of the stored transitions idx [B, n], flattened
        to B*n rows, sample-major."""
        size, n = idx.shape
        rows = torch.arange(size, device=idx.device)[:, None].expand(size, n)
        x_t = batch.latents[rows, idx].flatten(0, 1).to(self.device)
        x_next = batch.latents[rows, idx + 1].flatten(0, 1).to(self.device)
        cond = {name: v.repeat_interleave(n, 0) for name, v in batch.conditioning().items()}
        return x_t, x_next, idx.flatten().cpu(), cond

    def _score_stored(self, batch: TrajectoryBatch, idx: torch.Tensor):
        """log p_theta of the stored transitions idx [B, n] (flattened, with autograd), and the
        inputs and network output it used: (logp, (x_t, steps, cond, out))."""
        x_t, x_next, steps, cond = self._stored_transitions(batch, idx)
        out = self._model_output(x_t, steps, cond)
        _, logp = self._transition(steps, out, x_t, self.eta, prev_sample=x_next)
        return logp, (x_t, steps, cond, out)

    def keep_reference(self) -> None:
        """Keep the current weights as the reference policy of `log_prob_and_reference_kl` (call it
        before any update or checkpoint load). LoRA keeps no copy: the reference is the network with
        its adapters off; otherwise a frozen copy of the network is kept."""
        module = self._module()
        if any("lora_" in name for name, _ in module.named_parameters()):
            self._reference = "adapters_off"
        else:
            self._reference = copy.deepcopy(module).requires_grad_(False).eval()

    @contextlib.contextmanager
    def _reference_network(self):
        reference = getattr(self, "_reference", None)
        if reference is None:
            raise RuntimeError("algorithm.kl_beta > 0 needs the reference policy: call keep_reference() first")
        if reference == "adapters_off":
            module = self._module()
            module.disable_adapters()
            try:
                yield
            finally:
                module.enable_adapters()
            return
        network, self.unet = self.unet, reference
        try:
            yield
        finally:
            self.unet = network

    def log_prob_and_reference_kl(
        self, batch: TrajectoryBatch, step_indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p_theta of the stored transitions as `log_prob` gives it, KL(p_ref || p_theta)) [B],
        for one step index per sample, the KL with autograd through theta only.

        Both transitions are Gaussians with the same std sigma_t, so with the log-prob's convention
        (mean over latent dims) KL = mean_d (mu_theta - mu_ref)^2 / (2 sigma_t^2), which is
        log p_ref(mu_ref) - log p_theta(mu_ref): each transition scores the reference's mean, drawn
        by the reference with zero noise. Deterministic steps (sigma_t = 0) are not trained and must
        not be asked for.
        """
        idx = torch.as_tensor(step_indices, dtype=torch.long).to(batch.latents.device)
        logp, (x_t, steps, cond, out) = self._score_stored(batch, idx[:, None])
        with torch.no_grad(), self._reference_network():
            ref_out = self._model_output(x_t, steps, cond)
            mu_ref, logp_ref = self._transition(steps, ref_out, x_t, self.eta, noise=torch.zeros_like(x_t))
        _, logp_at_ref = self._transition(steps, out, x_t, self.eta, prev_sample=mu_ref)
        return logp, logp_ref - logp_at_ref

    # -------------------------------------------------------------------------------- weights
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def _trainable_keys(self) -> list[str]:
        """LoRA adapters if the network has any; else the parameters that train when some are
        frozen (`model.trainable` / `model.freeze`); else the whole state dict."""
        module = self._module()
        keys = list(module.state_dict().keys())
        lora = [k for k in keys if "lora_" in k]
        if lora:
            return lora
        params = dict(module.named_parameters())
        if any(not p.requires_grad for p in params.values()):
            return [k for k in keys if k in params and params[k].requires_grad]
        return keys

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights a sampler needs from the learner (`_trainable_keys`); detached CPU copies."""
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


def _first_of_each(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unique keys, index of each key's first row, each row's position in the unique list)."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    first = torch.full((len(unique),), len(keys), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(keys)), reduce="amin")
    return unique, first, inverse


def _per_sample(ids, num_prompts: int, k: int, name: str) -> torch.Tensor:
    """[B] long ids from one id per prompt (repeated K times) or one per sample."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() == num_prompts:
        return ids.repeat_interleave(k)
    if ids.numel() == num_prompts * k:
        return ids
    raise ValueError(f"{name}: {ids.numel()} values for {num_prompts} prompts x k={k}")
