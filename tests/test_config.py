"""Configuration: YAML in, presets, --set overrides, clear errors that name the key and file."""

import subprocess
import sys

import pytest
import yaml

from loop_ray.config import ConfigError, config_from_dict, dump_config, load_config, parse_overrides


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
