"""W&B beside TensorBoard, with W&B's real library in offline mode: what was logged is read back
from the offline run's transaction log (run-ID.wandb: W&B's LevelDB-style record log of protobuf
`Record`s) and compared with TensorBoard's events and metrics.jsonl; `--resume` continues the same
W&B run; without the wandb package loop-ray runs, and asking for W&B is a one-line error."""

import json
import struct
import sys
import time

import pytest

from loop_ray.config import ConfigError, load_config

BLOCK = 32768  # the record log's block size; a record header is crc32 (4), length (2), type (1)


def _record_payloads(data: bytes) -> list[bytes]:
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, out, parts = 7, [], []  # 7-byte file header: magic, version
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding to the end of the block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
        elif kind == 1:  # a whole record
            out.append(payload)
        elif kind == 2:  # first, middle and last pieces of a record spanning blocks
            parts = [payload]
        elif kind == 3:
            parts.append(payload)
        elif kind == 4:
            out.append(b"".join([*parts, payload]))
    return out


def read_offline_run(folder) -> dict:
    """{"id", "history": [{step, key: value}], "config": {key: value}, "exit_code"} of an offline-run-*
    folder."""
    from wandb.proto import wandb_internal_pb2

    (log,) = folder.glob("run-*.wandb")
    out = {"id": None, "history": [], "config": {}, "exit_code": None}
    for payload in _record_payloads(log.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"] = record.run.run_id
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            out["history"].append({"step": record.history.step.num, **row})
    return out


def _offline_runs(wandb_dir) -> list[dict]:
    """The offline runs under wandb_dir/wandb, once W&B's service process has written each to its
    end (the exit record): `finish()` returns before an offline run's log is complete."""
    folders = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    for _ in range(600):
        runs = [read_offline_run(f) for f in folders]
        if all(r["exit_code"] is not None for r in runs):
            break
        time.sleep(0.1)
    return runs


def _tensorboard_scalars(run_dir) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, all its files under tmp_path, quiet."""
    for var, sub in (("WANDB_DIR", "wandb_dir"), ("WANDB_CONFIG_DIR", "wandb_config"), ("WANDB_CACHE_DIR", "wandb_cache"),
                     ("WANDB_DATA_DIR", "wandb_data")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path / "wandb_dir"


def _cfg(tmp_path, **more):
    return load_config("configs/debug.yaml", {
        "output_dir": str(tmp_path / "runs"), "logging.wandb": {"project": "loop-ray-tests", "mode": "offline"},
        **more,
    })


def test_run_folder_logs_scalars_images_and_config_and_resumes_the_same_run(offline_wandb, tmp_path):
    """The same scalars as TensorBoard at the same steps, an image, the config; a reopened run
    folder (what --resume does) logs to the same W&B run id."""
    from loop_ray.system.run.run_dir import RunDir

    cfg = _cfg(tmp_path)
    run = RunDir.create(cfg)
    grid = run.path / "eval" / "before.png"
    from PIL import Image

    Image.new("RGB", (24, 16), (200, 30, 30)).save(grid)
    run.log({"kind": "eval", "label": "before", "eval/reward_mean": 0.25, "images_seen": 0, "eval/images": 8,
             "weights/in_sync": True, "work/sampler_images": [8], "eval/nan": float("nan")}, 0)
    run.log_image("eval/grid", grid, 0, caption="before")
    run.log({"kind": "train", "iteration": 0, "train/reward_mean": 0.5, "images_seen": 8}, 8)
    run.close()
    run_id = json.loads((run.path / "wandb_run.json").read_text())["id"]

    resumed = RunDir.reopen(run.path, cfg.model_copy(update={"iterations": 3}), [], 8)
    resumed.log({"kind": "train", "iteration": 1, "train/reward_mean": 0.75, "images_seen": 16}, 16)
    resumed.close()

    first, second = _offline_runs(offline_wandb)
    assert first["id"] == second["id"] == run_id and first["exit_code"] == second["exit_code"] == 0
    assert first["config"]["name"] == "debug" and first["config"]["iterations"] == 2
    assert second["config"]["iterations"] == 3  # the resumed run's config
    logged = {(k, row["step"]): v for r in (first, second) for row in r["history"] for k, v in row.items()
              if not k.startswith("_") and k != "step" and not k.startswith("eval/grid")}
    assert logged == _tensorboard_scalars(run.path)  # exactly TensorBoard's scalars, lists/bools/NaN left out
    (image,) = [row for row in first["history"] if "eval/grid/path" in row]
    assert image["step"] == 0 and image["eval/grid/caption"] == "before"
    assert (image["eval/grid/width"], image["eval/grid/height"]) == (24, 16)
    (media,) = offline_wandb.glob(f"wandb/offline-run-*-{run_id}/files/{image['eval/grid/path']}")
    assert media.stat().st_size > 0


def test_wandb_files_go_into_the_run_folder_and_a_failed_run_says_so(offline_wandb, tmp_path, monkeypatch):
    from loop_ray.system.run.run_dir import RunDir

    monkeypatch.delenv("WANDB_DIR")
    run = RunDir.create(_cfg(tmp_path))
    run.log({"train/reward_mean": 0.5}, 8)
    run.close(failed=True)  # what the driver does when the run stops on an error
    (found,) = _offline_runs(run.path)
    assert found["history"][0]["train/reward_mean"] == 0.5 and found["exit_code"] == 1
    assert [r["exit_code"] for r in _offline_runs(offline_wandb)] == []  # nothing in the old WANDB_DIR


def test_loop_ray_runs_without_wandb_and_asking_for_it_is_a_clear_error(tmp_path, monkeypatch):
    from loop_ray.system.run.run_dir import RunDir
    from loop_ray.system.run.validate import validate_inputs

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if not installed
    plain = load_config("configs/debug.yaml", {"output_dir": str(tmp_path), "logging.tensorboard": False})
    validate_inputs(plain)
    run = RunDir.create(plain)
    run.log({"train/reward_mean": 0.5}, 8)
    run.close()
    assert not (run.path / "wandb_run.json").exists()
    with pytest.raises(ConfigError) as err:
        validate_inputs(_cfg(tmp_path))
    assert str(err.value) == ("logging.wandb is set but the wandb package is not installed: "
                              "pip install 'loop-ray[wandb]' (or remove logging.wandb)")


def test_bad_wandb_settings_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"logging\.wandb\.mode"):
        load_config("configs/debug.yaml", {"logging.wandb": {"project": "p", "mode": "cloud"}})
    with pytest.raises(ConfigError, match=r"logging\.wandb\.project: Field required"):
        load_config("configs/debug.yaml", {"logging.wandb": {"entity": "me"}})


@pytest.mark.slow
def test_training_and_resume_log_to_one_wandb_run(ray_session, offline_wandb, tmp_path):
    """`loop-ray train` then `--resume`: one W&B run id, the train and eval scalars of every
    iteration as in metrics.jsonl and TensorBoard, an image grid per evaluation."""
    from loop_ray.cli.train import main
    from loop_ray.system.run.driver import train

    first = train(_cfg(tmp_path, iterations=2, **{"eval.max_prompts": 1, "eval.images_per_prompt": 1}))
    assert main(["--resume", str(first.run_dir), "--iterations", "3"]) == 0

    runs = _offline_runs(offline_wandb)
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]
    assert [r["config"]["iterations"] for r in runs] == [2, 3]
    records = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    logged = {row["step"]: row for r in runs for row in r["history"] if "train/reward_mean" in row}
    assert sorted(logged) == [r["images_seen"] for r in train_records] == [8, 16, 24]
    for r in train_records:
        assert logged[r["images_seen"]]["train/reward_mean"] == pytest.approx(r["train/reward_mean"], rel=1e-6)
        assert logged[r["images_seen"]]["learner/loss"] == pytest.approx(r["learner/loss"], rel=1e-6)
    tb = _tensorboard_scalars(first.run_dir)
    every = {(k, row["step"]): v for r in runs for row in r["history"] for k, v in row.items()
             if not k.startswith("_") and k != "step" and not k.startswith("eval/grid")}
    assert every.keys() == tb.keys()  # every TensorBoard scalar at its step, and nothing else
    grids = [(row["step"], row["eval/grid/caption"]) for r in runs for row in r["history"] if "eval/grid/path" in row]
    assert grids == [(0, "before"), (16, "after"), (24, "after")]
