"""Checkpoints, written atomically and verified before use.

Everything goes into checkpoints/.tmp-iter-NNNNNN/; the last file written is MANIFEST.json (every
other file's size and SHA-256), and only then is the folder renamed to checkpoints/iter-NNNNNN/.
The hashes are taken while the files are written (loop_ray.filehash): the learner ranks report the
files they wrote (DeepSpeed's state and trainable.pt hashed in the stream; the diffusers UNet, which
diffusers writes by itself, hashed by rank 0 right after, on its node) and the driver hashes its own
as it writes them, so the driver reads no weights back; it hashes from disk only what nobody
reported (DeepSpeed's small `latest` and recovery scripts).
A crash therefore never leaves a half checkpoint under a final name, and a final folder whose files
no longer match its manifest (truncated, edited, partly deleted) is refused by `verify_checkpoint`
with a message naming it; `latest_good_checkpoint` then falls back to the previous one. Layout:

  unet/               the trained UNet in diffusers format (LoRA merged): UNet2DConditionModel.from_pretrained;
                      transformer/ instead for a flow model (SD3Transformer2DModel / FluxTransformer2DModel)
  trainable.pt        the policy's trainable state dict (learner rank 0)
  deepspeed/<tag>/    DeepSpeed's checkpoint: module, optimizer state (every rank's ZeRO partition)
  driver_state.json   iteration, policy version, images seen, stat-tracker state, RNG states,
                      the metrics records so far
  config.yaml         the run's resolved configuration
  MANIFEST.json       sizes and hashes of all of the above

The learner workers write into the folder themselves, so on a multi-node cluster `output_dir`
must be a filesystem every learner node shares with the driver.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from loop_ray.config import ExperimentConfig, config_to_yaml
from loop_ray.filehash import hash_file, write_bytes_hashed

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used; the message names it and says what is wrong."""


def checkpoint_name(iteration: int) -> str:
    return f"iter-{iteration:06d}"


def write_manifest(folder: Path, written: dict[str, dict]) -> dict:
    """MANIFEST.json for every file under `folder`: the entries in `written` (hashed while written),
    and for a file not in it (one a library wrote by itself, e.g. DeepSpeed's `latest`) its entry
    from disk. A written entry whose size no longer matches the file raises CheckpointError."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name == MANIFEST:
            continue
        rel = p.relative_to(folder).as_posix()
        entry = written.get(rel)
        if entry is None:
            entry = hash_file(p)
            log.debug("checkpoint %s: %s hashed from disk (%d bytes)", folder.name, rel, entry["bytes"])
        elif entry["bytes"] != p.stat().st_size:
            raise CheckpointError(f"checkpoint {folder}: {rel} has {p.stat().st_size} bytes, "
                                  f"{entry['bytes']} were written (changed while saving?)")
        files[rel] = entry
    missing = sorted(set(written) - set(files))
    if missing:
        raise CheckpointError(f"checkpoint {folder}: written but not found: {', '.join(missing)}")
    manifest = {"files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def verify_checkpoint(folder: Path) -> dict:
    """Check a checkpoint folder against its manifest; returns its driver state. Raises
    CheckpointError naming the folder and the first problem found."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {folder}: no {MANIFEST} (incomplete or not a loop-ray checkpoint)")
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {folder}: unreadable {MANIFEST} ({err})") from None
    for name in ("driver_state.json", "config.yaml", "trainable.pt"):
        if name not in files:
            raise CheckpointError(f"checkpoint {folder}: the manifest lists no {name}")
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {folder}: {rel} is missing")
        if p.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"checkpoint {folder}: {rel} has {p.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)"
            )
        if hash_file(p)["sha256"] != meta["sha256"]:
            raise CheckpointError(f"checkpoint {folder}: {rel} does not match its SHA-256 in the manifest (corrupt)")
    return json.loads((folder / "driver_state.json").read_text())


def save_checkpoint(
    root: Path, iteration: int, cfg: ExperimentConfig, learner, driver_state: dict, keep_last: int
) -> Path:
    """Write the checkpoint after `iteration` iterations; returns its final folder."""
    name = checkpoint_name(iteration)
    final, tmp = root / name, root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    written = dict(learner.save_checkpoint(tmp.resolve(), tag=name))
    written["driver_state.json"] = write_bytes_hashed(tmp / "driver_state.json", json.dumps(driver_state).encode())
    written["config.yaml"] = write_bytes_hashed(tmp / "config.yaml", config_to_yaml(cfg).encode())
    write_manifest(tmp, written)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _prune(root, keep_last)
    return final


def checkpoints_newest_first(root: Path) -> list[Path]:
    return sorted((p for p in Path(root).glob("iter-*") if p.is_dir()), reverse=True)


def latest_good_checkpoint(root: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint under `root` that verifies, with its driver state; every refused one
    is logged with the reason. None when there is none."""
    for folder in checkpoints_newest_first(root):
        try:
            return folder, verify_checkpoint(folder)
        except CheckpointError as err:
            log.warning("%s; trying the previous checkpoint", err)
    return None


def _prune(root: Path, keep_last: int) -> None:
    for old in checkpoints_newest_first(root)[keep_last:]:
        shutil.rmtree(old)
