"""DDIM policies: the stochastic DDIM step and its log-prob (`logprob`), the policy (`policy`), the
SD component stack (`components`), Stable Diffusion 1.x/2.x loading (`stable_diffusion`) and the
tiny random SD stack for tests (`tiny`)."""
