"""The training loop and its state: the driver (`driver`, `loop-ray train`), the fan-out of a plan
to samplers and reward servers (`rollout`), evaluation through the running system (`evaluation`),
per-iteration metrics (`metrics`), the run folder (`run_dir`), resuming (`resume`) and the input
checks made before any actor starts (`validate`). `run/` orders the roles: it may import `roles/`,
`launch/`, loop_ray.training and the rest of loop_ray; nothing in `roles/` or `launch/` imports it."""
