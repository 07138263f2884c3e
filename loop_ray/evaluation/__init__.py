"""Evaluation: the held-out prompt draw every path uses (`heldout`), evaluating and sampling a
policy or checkpoint, and grids (`evaluate`)."""
