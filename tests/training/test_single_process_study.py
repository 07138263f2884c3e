"""The single-process loop, its TorchEngine, and `loop-ray study --quick`."""

import json

import torch

from loop_ray.config import config_from_dict, read_config_data
from loop_ray.training.torch_engine import TorchEngine

torch.set_num_threads(1)


def test_torch_engine_accumulates_then_steps_like_adamw_on_the_mean_loss():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    w_ref = torch.nn.Parameter(w.detach().clone())
    x1, x2 = torch.randn(5), torch.randn(5)
    cfg = config_from_dict({"learner": {"lr": 0.1, "weight_decay": 0.01, "max_grad_norm": 100.0}})
    engine = TorchEngine(cfg, [w], grad_accum_steps=2)
    for x in (x1, x2):
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward((w * x).sum() ** 2)
        engine.step()
    assert boundary and engine.micro_steps == 2
    ref = torch.optim.AdamW([w_ref], lr=0.1, weight_decay=0.01)
    (((w_ref * x1).sum() ** 2 + (w_ref * x2).sum() ** 2) / 2).backward()
    expected_norm = float(w_ref.grad.norm())
    ref.step()
    torch.testing.assert_close(w.detach(), w_ref.detach())
    assert abs(engine.get_global_grad_norm() - expected_norm) < 1e-4


def test_torch_engine_clips_the_global_norm():
    w = torch.nn.Parameter(torch.zeros(3))
    cfg = config_from_dict({"learner": {"lr": 1.0, "weight_decay": 0.0, "max_grad_norm": 0.5}})
    engine = TorchEngine(cfg, [w], grad_accum_steps=1)
    engine.backward((w * torch.tensor([30.0, 40.0, 0.0])).sum())
    engine.step()
    assert engine.get_global_grad_norm() == 50.0  # reported before clipping


def test_study_quick_runs_methods_and_writes_reports(tmp_path):
    from loop_ray.cli.study import main

    out = tmp_path / "study"
    assert main(["--quick", "--config", "configs/debug.yaml", "--out", str(out),
                 "--methods", "reinforce", "ppo", "loop_k3"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["reinforce", "ppo", "loop_k3"]
    assert [r["k"] for r in report["runs"]] == [1, 1, 3]
    assert all(r["images_seen"] == [12] for r in report["runs"])  # the same image budget
    assert "| loop_k3 | 3 |" in (out / "table.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000
    befores = {json.dumps(r["before"], sort_keys=True) for r in report["runs"]}
    assert len(befores) == 1  # the pre-trained model is evaluated once for the whole study

    # a second call finds every run in the cache (an interrupted study continues where it stopped)
    cached = sorted(p.name for p in (out / "cache").iterdir())
    assert len(cached) == 4  # the evaluation before training and the 3 runs
    assert main(["--quick", "--config", "configs/debug.yaml", "--out", str(out),
                 "--methods", "reinforce", "ppo", "loop_k3"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == report["runs"]


def test_default_study_config_resolves_for_every_method():
    """`loop-ray study` with no --config reads configs/study.yaml; every method must resolve on it
    with the same image budget."""
    from loop_ray.study import METHODS, method_overrides

    data = read_config_data("configs/study.yaml")
    for label in METHODS:
        cfg = config_from_dict(data, "configs/study.yaml", method_overrides(label, 96))
        assert cfg.sampling.k * cfg.sampling.prompts_per_iteration == 96
        assert cfg.eval.images_per_prompt == 10  # the paper's evaluation


def test_study_runs_seed_major_and_refuses_no_seeds(tmp_path, monkeypatch):
    """Every method's first seed is queued before any second seed (a study stopped early already
    compares every method); --seeds 0 is refused before anything runs."""
    import pytest

    from loop_ray import study
    from loop_ray.cli.study import main

    queued = []

    def fake_run_all(jobs, out_dir, workers):
        queued.extend((j["label"], j["seed"]) for j in jobs)
        raise RuntimeError("stop after queueing")

    monkeypatch.setattr(study, "_run_all", fake_run_all)
    monkeypatch.setattr(study, "_evaluate_before", lambda *a, **k: {"mean": 0.0, "categories": {}})
    with pytest.raises(RuntimeError, match="stop after queueing"):
        study.run_study("configs/debug.yaml", tmp_path / "s", ["reinforce", "loop_k2"], [0, 1], 12, 1,
                        "cpu", 1, 1)
    assert queued == [("reinforce", 0), ("loop_k2", 0), ("reinforce", 1), ("loop_k2", 1)]
    with pytest.raises(ValueError, match="no seeds"):
        study.run_study("configs/debug.yaml", tmp_path / "s", ["reinforce"], [], 12, 1, "cpu", 1, 1)
    with pytest.raises(SystemExit):
        main(["--seeds", "0", "--out", str(tmp_path / "t")])
