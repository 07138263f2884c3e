"""Rectified-flow policies (SD3/SD3.5, FLUX.1): the SDE and CPS steps with log-probs (`logprob`), the
policy (`policy`), the stacks and pipeline classes (`models`), loading (`loading`) and text
conditioning and latent packing (`text`)."""
