"""Checkpoint folders: written atomically with a manifest; a truncated or corrupt one is refused
with its name, and the previous good one is used (no Ray here: folders are made by hand)."""

import json
import logging

import pytest

from loop_ray.config import ConfigError, ExperimentConfig
from loop_ray.filehash import hash_file, write_bytes_hashed, write_hashed
from loop_ray.system.run.resume import (
    auto_resume_point,
    capture_rng,
    check_resumable,
    restore_rng,
    resume_point,
)
from loop_ray.training import checkpoint
from loop_ray.training.checkpoint import (
    CheckpointError,
    checkpoint_name,
    latest_good_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


class FakeLearner:
    """Writes what LearnerGroup.save_checkpoint writes, with recognisable bytes, and reports the
    entries of the files it wrote, hashed as written; like DeepSpeed's `latest`, one file goes
    unreported. `lie` reports a size the file does not have."""

    def __init__(self, fail: bool = False, lie: bool = False):
        self.fail, self.lie = fail, lie

    def save_checkpoint(self, folder, tag):
        written = {"trainable.pt": write_bytes_hashed(folder / "trainable.pt", b"weights-" + tag.encode() * 100)}
        (folder / "deepspeed" / tag).mkdir(parents=True)
        states = f"deepspeed/{tag}/mp_rank_00_model_states.pt"
        written[states] = write_bytes_hashed(folder / states, b"optimizer" * 50)
        (folder / "deepspeed" / "latest").write_text(tag)
        if self.fail:
            raise RuntimeError("node lost while writing")
        if self.lie:
            written[states] = {**written[states], "bytes": 1}
        return written


def _save(root, it, keep_last=5, fail=False, lie=False):
    state = {"iteration": it, "version": it, "images_seen": 8 * it, "records": []}
    return save_checkpoint(root, it, ExperimentConfig(), FakeLearner(fail, lie), state, keep_last)


def test_the_manifest_is_hashed_while_writing_not_read_back(tmp_path, monkeypatch):
    read_back = []
    monkeypatch.setattr(checkpoint, "hash_file", lambda p: read_back.append(p.name) or hash_file(p))
    folder = _save(tmp_path, 1)
    assert read_back == ["latest"]  # only the file nobody reported
    files = json.loads((folder / "MANIFEST.json").read_text())["files"]
    assert sorted(files) == ["config.yaml", "deepspeed/iter-000001/mp_rank_00_model_states.pt", "deepspeed/latest",
                             "driver_state.json", "trainable.pt"]
    assert files == {rel: hash_file(folder / rel) for rel in files}  # what a second read would give


def test_a_reported_size_the_file_lacks_fails_the_save(tmp_path):
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt"):
        _save(tmp_path, 1, lie=True)
    assert not (tmp_path / checkpoint_name(1)).exists()


def test_torch_save_through_the_hashing_stream_loads_and_matches_the_file(tmp_path):
    import torch

    state = {"w": torch.randn(64, 32), "step": torch.tensor(3)}
    for zipfile in (True, False):  # DeepSpeed's torch checkpoint engine uses the legacy format by default
        path = tmp_path / f"state-{zipfile}.pt"
        entry = write_hashed(path, lambda f, z=zipfile: torch.save(state, f, _use_new_zipfile_serialization=z))
        assert entry == hash_file(path)
        assert torch.equal(torch.load(path)["w"], state["w"])


def test_checkpoint_verifies_and_prunes_to_keep_last(tmp_path):
    for it in (1, 2, 3):
        _save(tmp_path, it, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(2), checkpoint_name(3)]
    assert verify_checkpoint(tmp_path / checkpoint_name(3))["iteration"] == 3


def test_crash_while_writing_leaves_the_previous_checkpoint_the_latest(tmp_path):
    _save(tmp_path, 1)
    with pytest.raises(RuntimeError, match="node lost"):
        _save(tmp_path, 2, fail=True)
    assert not (tmp_path / checkpoint_name(2)).exists()  # only the .tmp- folder got anything
    folder, state = latest_good_checkpoint(tmp_path)
    assert folder.name == checkpoint_name(1) and state["iteration"] == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no_manifest"])
def test_damaged_checkpoint_is_refused_by_name_and_the_previous_used(tmp_path, damage, caplog):
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    target = bad / "trainable.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[20] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        (bad / "deepspeed" / checkpoint_name(2) / "mp_rank_00_model_states.pt").unlink()
    else:
        (bad / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match=checkpoint_name(2)):
        verify_checkpoint(bad)
    with caplog.at_level(logging.WARNING):
        folder, state = latest_good_checkpoint(tmp_path)
    assert folder.name == checkpoint_name(1) and state["iteration"] == 1
    assert checkpoint_name(2) in caplog.text


def test_resume_point_of_a_run_folder_and_auto(tmp_path):
    cfg = ExperimentConfig(name="exp", output_dir=str(tmp_path))
    assert auto_resume_point(cfg) is None  # nothing to resume: a fresh run
    run = tmp_path / "exp-20260101-000000"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no usable checkpoint"):
        resume_point(run)
    _save(run / "checkpoints", 2)
    point = resume_point(run)
    assert point.run_dir == run and point.iteration == 2
    assert resume_point(point.checkpoint).run_dir == run  # a checkpoint folder works too
    assert auto_resume_point(cfg).checkpoint == point.checkpoint
    with pytest.raises(ConfigError, match="not a loop-ray run folder"):
        resume_point(tmp_path)


def test_resume_may_extend_the_run_but_not_change_its_maths(tmp_path):
    saved = ExperimentConfig(iterations=2)
    check_resumable(saved, ExperimentConfig(iterations=4), tmp_path)
    check_resumable(saved, saved.model_copy(update={"eval": saved.eval.model_copy(update={"every": 3})}), tmp_path)
    changed = saved.model_copy(update={"learner": saved.learner.model_copy(update={"lr": 1.0})})
    with pytest.raises(ConfigError, match="learner.lr"):
        check_resumable(saved, changed, tmp_path)


def test_rng_state_round_trips_through_json():
    import random

    import numpy as np
    import torch

    state = json.loads(json.dumps(capture_rng()))
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


class PipelineLearner(FakeLearner):
    """Also makes the checkpoint a whole pipeline, as learner rank 0 does: a trained unet/ and links
    to frozen parts written once per run; `crash` fails while the frozen parts are written."""

    def __init__(self, crash: bool = False):
        super().__init__()
        self.crash, self.frozen_writes = crash, 0

    def write_parts(self, out):
        self.frozen_writes += 1
        (out / "text_encoder").mkdir()
        (out / "text_encoder" / "model.safetensors").write_bytes(b"frozen" * 100)
        if self.crash:
            raise RuntimeError("node lost while writing the frozen parts")
        (out / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')

    def save_checkpoint(self, folder, tag):
        written = super().save_checkpoint(folder, tag)
        written["unet/weights"] = write_bytes_hashed((folder / "unet").mkdir() or folder / "unet" / "weights",
                                                     tag.encode() * 10)
        written.update(checkpoint.link_frozen_parts(folder, self.write_parts))
        return written


def test_frozen_parts_are_written_once_linked_and_verified(tmp_path):
    state = {"iteration": 1, "records": []}
    with pytest.raises(RuntimeError, match="frozen parts"):
        save_checkpoint(tmp_path, 1, ExperimentConfig(), PipelineLearner(crash=True), state, 2)
    assert not (tmp_path / "frozen").exists() and not (tmp_path / checkpoint_name(1)).exists()
    learner = PipelineLearner()
    for it in (1, 2, 3):
        save_checkpoint(tmp_path, it, ExperimentConfig(), learner, {**state, "iteration": it}, keep_last=2)
    assert learner.frozen_writes == 1  # once per run; the crash's temp folder was replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frozen", checkpoint_name(2), checkpoint_name(3)]
    for it in (2, 3):
        folder = tmp_path / checkpoint_name(it)
        files = json.loads((folder / "MANIFEST.json").read_text())["files"]
        assert files["text_encoder/model.safetensors"] == hash_file(tmp_path / "frozen" / "text_encoder" / "model.safetensors")
        assert "model_index.json" in files and "unet/weights" in files
        assert verify_checkpoint(folder)["iteration"] == it
    (tmp_path / "frozen" / "text_encoder" / "model.safetensors").write_bytes(b"broken" * 100)  # same size
    with pytest.raises(CheckpointError, match="text_encoder/model.safetensors does not match"):
        verify_checkpoint(tmp_path / checkpoint_name(3))
