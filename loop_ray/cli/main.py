"""`loop-ray <command> [args]`: each command lives in its own module with a `main(argv)` that parses
its arguments and calls library functions."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("loop_ray.cli.train", "train LOOP (or another preset) with the Ray actor-learner system"),
    "eval": ("loop_ray.cli.eval", "mean reward per prompt category on held-out prompts, with an image grid"),
    "sample": ("loop_ray.cli.sample", "sample images for prompts into a grid PNG or a folder of PNGs"),
    "pretrain-toy": ("loop_ray.cli.pretrain_toy", "pre-train the embedded world's small text-to-image model"),
    "config": ("loop_ray.cli.config", "config show CONFIG [--set key=value ...]: print the resolved config"),
    "bench": ("loop_ray.cli.bench", "speed and memory benchmarks as ratios against baselines"),
    "study": ("loop_ray.cli.study", "the paper's efficiency-effectiveness study on the embedded world"),
    "diagnose": ("loop_ray.cli.diagnose", "policy-gradient diagnostics: consistent across prompts? aligned with guidance distillation? (vs nulls)"),
}


def _usage() -> str:
    lines = ["usage: loop-ray <command> [args]", "", "commands:"]
    lines += [f"  {name:<14}{doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"loop-ray: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise  # a bug: the traceback says where
        print(f"loop-ray {name}: {err}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises (each message names the key, file or folder): a config that cannot be used,
    a damaged checkpoint, a model folder that is not one, a path that is missing or unreadable."""
    from loop_ray.config import ConfigError
    from loop_ray.training.checkpoint import CheckpointError

    errors = (ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
    flow = sys.modules.get("loop_ray.diffusion.flow.loading")  # loaded only if a flow model was
    return errors + ((flow.FlowModelError,) if flow is not None else ())


if __name__ == "__main__":
    sys.exit(main())
