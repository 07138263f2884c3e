"""Prompt sources: the packaged T2I-CompBench and DDPO lists, plain files, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from loop_ray.prompts import load_prompts

ASSETS = Path(__file__).resolve().parents[1] / "loop_ray" / "assets" / "prompts"
REPO = Path(__file__).resolve().parents[1]
# the upstream T2I-CompBench and DDPO files: in shared/data beside the repository (where CI's clone has
# them), or inside it
SHARED_CANDIDATES = (REPO.parent / "shared" / "data", REPO / "shared" / "data")
SHARED = next((p for p in SHARED_CANDIDATES if p.is_dir()), SHARED_CANDIDATES[0])
CATEGORIES = ("color", "shape", "texture", "spatial", "numeracy", "non_spatial", "complex", "3d_spatial")


@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("split", ["train", "val"])
def test_compbench_split_loads_with_its_category(category, split):
    ps = load_prompts(f"compbench:{category}_{split}")
    expected = [ln.strip() for ln in (ASSETS / "compbench" / f"{category}_{split}.txt").read_text().splitlines()
                if ln.strip()]
    assert ps.prompts == expected  # every line, stripped of the upstream CRLF endings
    assert (250 if split == "val" else 650) < len(ps) < (350 if split == "val" else 750)
    assert ps.categories == [category] * len(ps)
    assert ps.source == f"compbench:{category}_{split}"
    assert all("\r" not in p and p == p.strip() for p in ps.prompts)


def test_packaged_prompts_are_the_upstream_files_with_licences():
    if not SHARED.is_dir():
        pytest.skip("the upstream T2I-CompBench and DDPO files to compare the packaged prompts with are not here: "
                    f"looked for {' and '.join(map(str, SHARED_CANDIDATES))} (a clone beside shared/data, as CI's is, "
                    "runs this check)")
    for name in [f"{c}_{s}.txt" for c in CATEGORIES for s in ("train", "val")] + ["LICENSE.txt"]:
        assert (ASSETS / "compbench" / name).read_bytes() == (SHARED / "t2i-compbench" / name).read_bytes(), name
    for name in ("simple_animals.txt", "activities.txt", "LICENSE.txt"):
        assert (ASSETS / "ddpo" / name).read_bytes() == (SHARED / "ddpo" / name).read_bytes(), name
    assert "MIT License" in (ASSETS / "compbench" / "LICENSE.txt").read_text()
    assert "MIT License" in (ASSETS / "ddpo" / "LICENSE.txt").read_text()


def test_ddpo_lists():
    animals = load_prompts("ddpo:simple_animals")
    assert len(animals) == 45 and animals.prompts[:3] == ["cat", "dog", "horse"]
    assert set(animals.categories) == {"simple_animals"}
    activities = load_prompts("ddpo:activities")
    assert activities.prompts == ["washing the dishes", "riding a bike", "playing chess"]
    pairs = load_prompts("ddpo:animal_activities")  # DDPO's prompt-alignment prompts, "a(n) ANIMAL ACTIVITY"
    assert len(pairs) == 45 * 3
    assert pairs.prompts[0] == "a cat washing the dishes"
    assert "an ant playing chess" in pairs.prompts and "an elephant" not in " ".join(pairs.prompts)
    assert set(pairs.categories) == {"animal_activities"}


def test_plain_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# a comment\n a red cube \n\nblue sphere\r\n")
    ps = load_prompts(str(path))
    assert ps.prompts == ["a red cube", "blue sphere"]
    assert ps.categories == ["mine", "mine"]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n   \n")
    with pytest.raises(ValueError, match="empty.txt has no prompts"):
        load_prompts(str(empty))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="binary.txt is unreadable"):
        load_prompts(str(binary))
    with pytest.raises(FileNotFoundError, match="unknown T2I-CompBench split 'colour_val'.*color_val"):
        load_prompts("compbench:colour_val")
    with pytest.raises(FileNotFoundError, match="no_such_list.txt"):
        load_prompts("ddpo:no_such_list")


PAPER_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_validate_and_their_prompts_and_rewards_resolve(path):
    from loop_ray.config import load_config
    from loop_ray.rewards import available_rewards

    cfg = load_config(path)
    assert cfg.model.kind == "stable_diffusion" and cfg.model.path == "stabilityai/stable-diffusion-2-base"
    assert (cfg.sampling.num_steps, cfg.sampling.guidance_scale, cfg.sampling.eta) == (50, 5.0, 1.0)
    assert (cfg.learner.lr, cfg.learner.weight_decay, cfg.learner.max_grad_norm) == (1e-5, 1e-4, 1.0)
    assert cfg.algorithm.clip_eps == 1e-4 and cfg.learner.num_workers == 8
    assert cfg.sampling.prompts_per_iteration == 4 * cfg.learner.num_workers  # 4 prompts per GPU
    assert cfg.sampling.k == (4 if cfg.algorithm.preset == "loop" else 1)
    assert cfg.algorithm.preset == path.stem.rsplit("_", 1)[1]
    assert len(load_prompts(cfg.prompts.train)) > 0 and len(load_prompts(cfg.prompts.val)) > 0
    assert all(term.name in available_rewards() for term in cfg.reward.terms)


def test_paper_configs_come_in_loop_ppo_pairs():
    stems = {p.stem for p in PAPER_CONFIGS}
    tasks = {"color", "shape", "texture", "aesthetic", "alignment"}
    assert stems == {f"{t}_{a}" for t in tasks for a in ("loop", "ppo")}
