"""The options `loop-ray eval` and `loop-ray sample` share: which model and config, overrides, device."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="experiment YAML (default: the --checkpoint run's own)")
    p.add_argument("--checkpoint", default=None,
                   help="a run folder (its newest good checkpoint), one of its checkpoint folders, or a model "
                        "folder (diffusers layout) in place of model.path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted-key config override")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
