"""The Ray system of loop-ray (named `system`, not `ray`, so as not to shadow the library), in four
parts: `roles/` (the actors: samplers, reward servers, buffer, learner group, weight publication,
actor sets), `run/` (the training loop and its state, which orders the roles), `engines/` (a
learner worker's optimiser engine and update step, no Ray) and `launch/` (joining a cluster and
starting the roles with their resources)."""
