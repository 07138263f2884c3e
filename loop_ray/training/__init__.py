"""The learning core without Ray: one worker's update on its shard of an iteration (`update`: the
clipped IS loss, the KL term), the DeepSpeed engine built from `cfg.learner` (`deepspeed_engine`), a
plain-torch engine with the same API (`torch_engine`), what each iteration and evaluation samples
(`plan`), checkpoint writing and verification (`checkpoint`), and the single-process loop that ties
them together on one device (`single_process`). The Ray roles in loop_ray.system call into it;
nothing here imports loop_ray.system."""
