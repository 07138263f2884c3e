"""The roles of the actor-learner system: samplers (`sampler`), reward servers (`reward_server`),
the driver's trajectory buffer (`buffer`), the LearnerGroup of DeepSpeed workers (`learner`),
versioned weight publication from learner to samplers (`weights`) and the replaceable actor sets
that hold a role's actors (`actors`). A role does one job when called and knows nothing of the
loop: roles may import loop_ray.training (engines, update, checkpoint), the maths and model
modules of loop_ray (algorithms, trajectory, diffusion, rewards, config, utils) and, for an actor's resources and environment,
`launch/cluster.py`; never `run/`."""
