"""Configuration: YAML in, presets, --set overrides, clear errors that name the key and file."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loop_ray.config import (
    ConfigError,
    config_from_dict,
    dump_config,
    load_config,
    parse_overrides,
    read_config_data,
)


def _write(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_are_loop_on_the_toy_world():
    cfg = config_from_dict({})
    assert cfg.algorithm.preset == "loop" and cfg.sampling.k == 4
    assert cfg.algorithm.advantage == "leave_one_out" and cfg.algorithm.importance_sampling
    assert cfg.model.kind == "toy" and cfg.reward.terms[0].name == "toy_binding"


def test_yaml_and_overrides(tmp_path):
    path = _write(tmp_path, {"sampling": {"num_steps": 10}, "algorithm": {"clip_eps": 0.01}})
    cfg = load_config(path, ["algorithm.clip_eps=1e-4", "learner.lr=3e-5", "reward.terms.0.weight=2",
                             "logging.tensorboard=false"])
    assert cfg.sampling.num_steps == 10
    assert cfg.algorithm.clip_eps == 1e-4 and cfg.learner.lr == 3e-5
    assert cfg.reward.terms[0].weight == 2.0 and cfg.logging.tensorboard is False


def test_preset_fills_only_unset_keys(tmp_path):
    cfg = load_config(_write(tmp_path, {"algorithm": {"preset": "ppo"}, "sampling": {"prompts_per_iteration": 4}}))
    assert cfg.sampling.k == 1 and cfg.algorithm.advantage == "stat_tracker"
    cfg = load_config(_write(tmp_path, {"algorithm": {"preset": "loop"}, "sampling": {"k": 3, "prompts_per_iteration": 4}}),
                      ["learner.minibatch_size=3"])
    assert cfg.sampling.k == 3  # LOOP with k=3 (the paper's study)


def test_unknown_key_names_path_and_file(tmp_path):
    path = _write(tmp_path, {"algorithm": {"clip_epsilon": 0.1}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "algorithm.clip_epsilon" in str(err.value) and str(path) in str(err.value)
    assert "unknown key" in str(err.value)


def test_wrong_type_names_path(tmp_path):
    path = _write(tmp_path, {"sampling": {"num_steps": "many"}})
    with pytest.raises(ConfigError, match=r"sampling\.num_steps"):
        load_config(path)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"algorithm": {"preset": "loop"}, "sampling": {"k": 1}}, "sampling.k"),
        ({"algorithm": {"preset": None, "advantage": "group_std"}, "sampling": {"k": 1}}, "sampling.k"),
        ({"sampling": {"prompts_per_iteration": 3, "k": 4}, "learner": {"num_workers": 8}}, "learner.num_workers"),
        ({"sampling": {"prompts_per_iteration": 2, "k": 4}, "learner": {"minibatch_size": 3}}, "learner.minibatch_size"),
        ({"algorithm": {"preset": "reinforce", "inner_epochs": 2}}, "algorithm.inner_epochs"),
        ({"algorithm": {"preset": "nope"}}, "algorithm.preset"),
        ({"sampling": {"num_steps": 4}, "algorithm": {"skip_first_steps": 2, "skip_last_steps": 2}}, "skip_first_steps"),
        ({"model": {"kind": "stable_diffusion"}}, "model.path"),
        ({"cluster": {"mode": "sync", "max_staleness": 2}}, "max_staleness"),
    ],
)
def test_impossible_combinations_are_rejected(tmp_path, data, key):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_bad_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["algorithm.clip_eps"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(_write(tmp_path, {}), ["reward.terms.3.weight=1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_dump_round_trip(tmp_path):
    cfg = config_from_dict({"sampling": {"k": 2, "prompts_per_iteration": 2}, "learner": {"minibatch_size": 2}})
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_config_show_cli(tmp_path):
    path = _write(tmp_path, {"name": "shown"})
    out = subprocess.run([sys.executable, "-m", "loop_ray.cli", "config", "show", str(path), "--set", "seed=7"],
                         capture_output=True, text=True, check=True).stdout
    shown = yaml.safe_load(out)
    assert shown["name"] == "shown" and shown["seed"] == 7 and shown["algorithm"]["preset"] == "loop"
    bad = subprocess.run([sys.executable, "-m", "loop_ray.cli", "config", "show", str(path), "--set", "foo.bar=1"],
                         check=False, capture_output=True, text=True)
    assert bad.returncode == 2 and "foo" in bad.stderr


def test_preset_given_by_override_still_applies(tmp_path):
    cfg = load_config(_write(tmp_path, {"sampling": {"prompts_per_iteration": 4}}),
                      ["algorithm.preset=ppo", "algorithm.clip_eps=1e-3"])
    assert cfg.sampling.k == 1 and cfg.algorithm.advantage == "stat_tracker" and cfg.algorithm.clip_eps == 1e-3


@pytest.mark.parametrize(
    "term, message",
    [
        ({"name": "a:b", "runtime_env": {"image_uri": "img:1", "pip": ["x"]}},
         "reward.terms.0.runtime_env: image_uri can be combined only with env_vars"),
        ({"name": "a:b", "runtime_env": {"env_vars": {"N": 1}}}, "reward.terms.0.runtime_env.env_vars.N"),
        ({"name": "a:b", "runtime_env": {"conda": "env"}}, "reward.terms.0.runtime_env.conda: unknown key"),
        ({"name": "a:b", "runtime_env": {"pip": "torch"}}, "reward.terms.0.runtime_env.pip"),
    ],
)
def test_bad_runtime_env_names_the_key(tmp_path, term, message):
    path = _write(tmp_path, {"reward": {"terms": [term]}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_runtime_env_in_yaml_and_by_override(tmp_path):
    path = _write(tmp_path, {"reward": {"terms": [{"name": "a:b", "runtime_env": {"pip": ["x==1"]}}],
                                        "runtime_env": {"env_vars": {"HF_HOME": "/m"}}}})
    cfg = load_config(path, ["reward.terms.0.runtime_env.env_vars.K=v"])
    assert cfg.reward.terms[0].runtime_env.to_ray() == {"pip": ["x==1"], "env_vars": {"K": "v"}}
    assert cfg.reward.runtime_env.to_ray() == {"env_vars": {"HF_HOME": "/m"}}
    assert config_from_dict({}).reward.terms[0].runtime_env is None


def test_a_config_extends_its_base_deep_merged(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path, {"name": "base", "seed": 3, "sampling": {"k": 3, "num_steps": 7},
                      "reward": {"terms": [{"name": "toy_binding"}, {"name": "jpeg_compressibility", "weight": 0.5}]}},
           "base.yaml")
    _write(tmp_path, {"base": "../base.yaml", "name": "middle", "sampling": {"num_steps": 5}}, "sub/middle.yaml")
    child = _write(tmp_path, {"base": "sub/middle.yaml", "name": "child", "learner": {"lr": 2e-5},
                              "reward": {"terms": [{"name": "toy_object_area"}]}}, "child.yaml")
    cfg = load_config(child, ["sampling.k=2"])
    assert cfg.name == "child" and cfg.seed == 3  # the nearest file wins; the rest comes from the bases
    assert (cfg.sampling.k, cfg.sampling.num_steps, cfg.learner.lr) == (2, 5, 2e-5)  # merged per key, --set last
    assert [t.name for t in cfg.reward.terms] == ["toy_object_area"]  # a list is replaced, not merged
    assert "base" not in read_config_data(child)


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_toy_easy_is_toy_with_its_differences():
    easy, toy = (_flat(load_config(f"configs/{n}.yaml").model_dump(mode="json")) for n in ("toy_easy", "toy"))
    assert yaml.safe_load(Path("configs/toy_easy.yaml").read_text())["base"] == "toy.yaml"
    assert {k for k in easy if easy[k] != toy[k]} == {"name", "iterations", "reward.terms", "algorithm.kl_beta",
                                                       "learner.lr", "model.trainable"}
    assert easy["reward.terms"][0]["name"] == "toy_object_area" and easy["algorithm.kl_beta"] == 0.0


def test_missing_base_and_base_cycles_are_one_line_errors_naming_the_files(tmp_path):
    missing = _write(tmp_path, {"base": "nowhere.yaml"}, "a.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(missing)
    assert str(err.value) == f"{missing}: base config not found: {tmp_path / 'nowhere.yaml'}"
    _write(tmp_path, {"base": "c.yaml", "seed": 1}, "b.yaml")
    _write(tmp_path, {"base": "b.yaml", "seed": 2}, "c.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "b.yaml")
    message = str(err.value)
    assert "\n" not in message and "base configs form a cycle" in message
    assert message.endswith(f"{tmp_path / 'b.yaml'} -> {tmp_path / 'c.yaml'} -> {tmp_path / 'b.yaml'}")
    self_base = _write(tmp_path, {"base": "self.yaml"}, "self.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(self_base)
    with pytest.raises(ConfigError, match="base: expected a path"):
        load_config(_write(tmp_path, {"base": 3}, "num.yaml"))


def test_config_show_prints_the_resolved_config_of_a_config_with_a_base(tmp_path):
    out = subprocess.run([sys.executable, "-m", "loop_ray.cli", "config", "show", "configs/toy_easy.yaml"],
                         capture_output=True, text=True, check=True).stdout
    shown = yaml.safe_load(out)
    assert "base" not in shown and shown["name"] == "toy_easy" and shown["learner"]["lr"] == 3e-5
    assert shown["sampling"]["group_noise"] == "shared"  # from configs/toy.yaml
    bad = _write(tmp_path, {"base": "gone.yaml"}, "bad.yaml")
    run = subprocess.run([sys.executable, "-m", "loop_ray.cli", "config", "show", str(bad)], capture_output=True,
                         text=True, check=False)
    assert run.returncode == 2
    assert run.stderr == f"loop-ray config: {bad}: base config not found: {tmp_path / 'gone.yaml'}\n"
