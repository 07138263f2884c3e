"""Diffusion maths and the policy: DDIM steps with log-probs, K-trajectory sampling, model stacks."""
