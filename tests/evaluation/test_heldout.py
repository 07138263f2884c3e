"""One held-out draw: the study's single-process loop, the Ray driver's plan and `loop-ray eval` evaluate
the same prompts (and seeds) for the same config, eval.max_prompts set or not."""

import numpy as np
import pytest

import loop_ray.evaluation.evaluate as evaluate_module
import loop_ray.training.single_process as single_process_module
from loop_ray.cli.main import main as cli_main
from loop_ray.config import load_config
from loop_ray.evaluation.heldout import eval_prompt_indices, eval_seeds, in_turn
from loop_ray.prompts import load_prompts
from loop_ray.training.plan import plan_eval
from loop_ray.training.single_process import SingleProcessRun


class Captured(Exception):
    """Raised by the stand-in evaluate_policy once it has recorded what it was asked to evaluate."""


def _capture(monkeypatch, module, seen: list):
    def fake(policy, reward, prompt_set, images_per_prompt, seed, batch_size, prompt_indices=None, **_):
        seen.append((list(prompt_indices), eval_seeds(seed, prompt_indices, images_per_prompt)))
        raise Captured

    monkeypatch.setattr(module, "evaluate_policy", fake)


@pytest.mark.parametrize("max_prompts", [7, None])
def test_study_driver_and_loop_ray_eval_evaluate_the_same_prompts(monkeypatch, tmp_path, max_prompts):
    overrides = [f"output_dir={tmp_path}", "eval.images_per_prompt=2", "eval.seed=77"]
    if max_prompts is not None:
        overrides.append(f"eval.max_prompts={max_prompts}")
    cfg = load_config("configs/toy.yaml", overrides)
    val_set = load_prompts(cfg.prompts.val)

    driver = plan_eval(cfg, val_set)

    seen: list = []
    _capture(monkeypatch, single_process_module, seen)
    with pytest.raises(Captured):
        SingleProcessRun(cfg).evaluate()
    _capture(monkeypatch, evaluate_module, seen)
    with pytest.raises(Captured):
        cli_main(["eval", "--config", "configs/toy.yaml", *[a for o in overrides for a in ("--set", o)],
                  "--out", str(tmp_path / "eval"), "--no-progress"])
    (study_idx, study_seeds), (eval_idx, eval_seeds_) = seen

    assert study_idx == eval_idx == list(driver.prompt_ids)
    assert study_seeds == eval_seeds_ == list(driver.seeds)
    expected = len(val_set) if max_prompts is None else max_prompts
    assert len(driver.prompt_ids) == expected
    if max_prompts is not None:  # a balanced draw: every category, none more than once over the others
        counts = np.unique([val_set.categories[i] for i in driver.prompt_ids], return_counts=True)[1]
        assert len(counts) == len(set(val_set.categories)) and counts.max() - counts.min() <= 1


def test_in_turn_takes_categories_in_turn_in_source_order_or_permuted():
    categories = ["a", "a", "a", "b", "c", "c"]
    assert in_turn(categories, 3) == [0, 3, 4]
    assert in_turn(categories, 5) == [0, 1, 3, 4, 5]
    assert in_turn(categories, 10) == list(range(6))
    drawn = in_turn(categories, 3, np.random.default_rng(0))
    assert sorted(categories[i] for i in drawn) == ["a", "b", "c"]
    assert drawn == in_turn(categories, 3, np.random.default_rng(0))  # fixed by the seed


def test_eval_prompt_indices_follow_eval_seed_and_max_prompts():
    val_set = load_prompts("toy:val")
    a = eval_prompt_indices(load_config("configs/toy.yaml", ["eval.max_prompts=8", "eval.seed=1"]), val_set)
    b = eval_prompt_indices(load_config("configs/toy.yaml", ["eval.max_prompts=8", "eval.seed=2"]), val_set)
    assert len(a) == len(b) == 8 and a == sorted(a) and a != b
    assert eval_prompt_indices(load_config("configs/toy.yaml", ["eval.max_prompts=1000"]), val_set) == \
        list(range(len(val_set)))
