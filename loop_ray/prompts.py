"""Prompt sources.

A source is named by a string:
  toy:pretrain | toy:train | toy:val      the embedded world's grammar split (loop_ray.toy.grammar);
  toy:train:two_object                    one category of a split (the paper trains one task at a time)
  compbench:<split>                       T2I-CompBench, e.g. compbench:color_train, compbench:shape_val
  ddpo:<list>                             DDPO's lists: ddpo:simple_animals, ddpo:activities
  <path>                                  any text file, one prompt a line (blank lines and # comments skipped)
Each prompt has a category (the toy grammar's, the CompBench split's, or the file's stem) so that
evaluation can report per category.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class PromptSet:
    prompts: list[str]
    categories: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.prompts)


def _assets() -> Path:
    return Path(str(resources.files("loop_ray") / "assets" / "prompts"))


def read_prompt_file(path: str | Path, source: str | None = None) -> list[str]:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"prompt file {path} is a folder, not a text file"
                                + (f" (from {source})" if source else ""))
    if not path.is_file():
        hint = f" (from {source})" if source else (
            " (a prompt source is toy:<split>, compbench:<split>, ddpo:<list> or a text file)")
        raise FileNotFoundError(f"prompt file not found: {path}{hint}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"prompt file {path} is unreadable: {err}") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(
            f"prompt file {path} has no prompts (one prompt a line expected; blank lines and # comments "
            "are skipped)"
        )
    return prompts


def load_prompts(spec: str) -> PromptSet:
    """Resolve a prompt-source string (see the module docstring) to prompts with categories."""
    if spec.startswith("toy:"):
        from loop_ray.toy.grammar import CATEGORIES, prompt_split

        split, _, only = spec.split(":", 1)[1].partition(":")
        pairs = prompt_split(split)
        if only:
            if only not in CATEGORIES:
                raise ValueError(f"unknown toy category {only!r} in prompt source {spec!r}; categories: {list(CATEGORIES)}")
            pairs = [(p, c) for p, c in pairs if c == only]
        return PromptSet([p for p, _ in pairs], [c for _, c in pairs], spec)
    if spec.startswith("compbench:"):
        split = spec.split(":", 1)[1]
        path = _assets() / "compbench" / f"{split}.txt"
        if not path.is_file():
            known = sorted(p.stem for p in (_assets() / "compbench").glob("*.txt"))
            raise FileNotFoundError(f"unknown T2I-CompBench split {split!r} in {spec!r}; known: {known}")
        prompts = read_prompt_file(path, spec)
        category = split.rsplit("_", 1)[0]
        return PromptSet(prompts, [category] * len(prompts), spec)
    if spec.startswith("ddpo:"):
        name = spec.split(":", 1)[1]
        prompts = read_prompt_file(_assets() / "ddpo" / f"{name}.txt", spec)
        return PromptSet(prompts, [name] * len(prompts), spec)
    prompts = read_prompt_file(spec)
    return PromptSet(prompts, [Path(spec).stem] * len(prompts), spec)
