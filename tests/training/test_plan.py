"""The driver's plans: which prompts and seeds each iteration and each evaluation samples."""

import pytest

from loop_ray.config import config_from_dict
from loop_ray.prompts import PromptSet
from loop_ray.training.plan import plan_eval, plan_iteration


def _cfg(**over):
    data = {
        "sampling": {"k": 2, "prompts_per_iteration": 3},
        "learner": {"minibatch_size": 2},
        "eval": {"images_per_prompt": 2, "max_prompts": 4},
    }
    for key, value in over.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    return config_from_dict(data)


def test_iteration_plan_is_deterministic_and_split_by_whole_prompts():
    prompts = PromptSet([f"p{i}" for i in range(10)], ["c"] * 10, "test")
    cfg = _cfg()
    p0, again, p1 = plan_iteration(cfg, prompts, 0), plan_iteration(cfg, prompts, 0), plan_iteration(cfg, prompts, 1)
    assert p0 == again and p0.seeds != p1.seeds
    assert len(p0.prompts) == 3 and len(p0.seeds) == 6 and p1.group_ids == [3, 4, 5]
    jobs = p0.split(2)
    assert sum(len(j.prompts) for j in jobs) == 3
    assert [s for j in jobs for s in j.seeds] == p0.seeds
    assert len(p0.split(5)) == 3  # never an empty share


@pytest.mark.parametrize("max_prompts", [4, None])
def test_eval_plan_is_fixed_and_spreads_over_categories(max_prompts):
    prompts = PromptSet([f"p{i}" for i in range(9)], ["a"] * 6 + ["b"] * 3, "test")
    cfg = _cfg(eval__max_prompts=max_prompts)
    plan = plan_eval(cfg, prompts)
    assert plan == plan_eval(cfg, prompts)
    assert len(plan.seeds) == len(plan.prompts) * 2 and len(set(plan.seeds)) == len(plan.seeds)
    if max_prompts:
        assert sorted(plan.categories) == ["a", "a", "b", "b"]
