"""The Ray system of loop-ray (named `system`, not `ray`, so as not to shadow the library), in three
parts: `roles/` (the actors: samplers, reward servers, buffer, learner group, weight publication,
actor sets), `run/` (the training loop and its state, which orders the roles) and `launch/`
(joining a cluster and starting the roles with their resources). The maths each role runs lives
outside, in loop_ray.training, loop_ray.diffusion, loop_ray.algorithms and loop_ray.rewards."""
