"""Diffusion policies. Shared by both model families: the Gaussian step (`gaussian`), the policy
base (K-trajectory sampling, stochastic-step windows, group noise, log-prob recompute:
`policy_base`, `windows`), trainable subsets and LoRA, pipeline folders, model kinds. `ddim/`: the
DDIM step with its log-prob and the SD 1.x/2.x, tiny and embedded stacks; `flow/`: the flow SDE/CPS
step and the SD3/FLUX policy. `factory.build_policy` picks one; nothing here imports it."""
