"""A learner worker's engine and update, without Ray: the DeepSpeed engine built from
`cfg.learner` (`deepspeed_engine`), a plain-torch engine with the same API for the single-process
loop (`torch_engine`), and one worker's update on its shard of an iteration (`update`). Engines
import only the maths modules of loop_ray (config, algorithms, trajectory) and each other; the
learner role and `loop_ray.local` import them."""
