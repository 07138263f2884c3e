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
  model_index.json    the pipeline's index, so that the folder is a whole pipeline: the pipeline class's
                      own from_pretrained(CKPT) loads it (toy: loop_ray.toy.model.load_toy_components)
  text_encoder/ ...   the frozen parts (text encoders, tokenizers, scheduler, VAE): relative symlinks
                      into ../frozen/, which rank 0 writes once per run (see `link_frozen_parts`)
  trainable.pt        the policy's trainable state dict (learner rank 0)
  deepspeed/<tag>/    DeepSpeed's checkpoint: module, optimizer state (every rank's ZeRO partition)
  driver_state.json   iteration, policy version, images seen, stat-tracker state, RNG states,
                      the metrics records so far
  config.yaml         the run's resolved configuration
  MANIFEST.json       sizes and hashes of all of the above, the linked frozen files included (so a
                      damaged frozen file is refused by name, like any other)

checkpoints/frozen/ holds the frozen parts once (written to checkpoints/.tmp-frozen/ with its own
MANIFEST.json and renamed, as a checkpoint is); pruning a checkpoint removes its links, never the
targets, so every remaining checkpoint stays whole. Copy a single checkpoint elsewhere with
`cp -rL` (dereferencing the links); copying a whole run folder or its checkpoints/ keeps them working.

The learner workers write into the folder themselves, so on a multi-node cluster `output_dir`
must be a filesystem every learner node shares with the driver.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from loop_ray.config import ExperimentConfig, config_to_yaml
from loop_ray.filehash import hash_file, write_bytes_hashed

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
FROZEN = "frozen"  # checkpoints/frozen/: the pipeline's frozen parts, linked from every checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be used; the message names it and says what is wrong."""


def checkpoint_name(iteration: int) -> str:
    return f"iter-{iteration:06d}"


def _files(folder: Path) -> list[Path]:
    """Every file under `folder`, through symlinked folders (the frozen parts), sorted."""
    out = []
    for top, _, names in os.walk(folder, followlinks=True):
        out += [Path(top) / n for n in names]
    return sorted(p for p in out if p.is_file())


def link_frozen_parts(checkpoint: Path, write_parts: Callable[[Path], None]) -> dict[str, dict]:
    """Make the checkpoint folder `checkpoint` a whole pipeline: copy model_index.json into it and
    link (relative symlinks) each frozen part folder from `checkpoint.parent / FROZEN`, which is
    written first if the run has none yet: `write_parts(folder)` writes model_index.json and the part
    folders into a temp folder, which is hashed (once per run), given a manifest and renamed.
    Returns the manifest entries of the checkpoint's new files (the linked files under their
    paths through the links; their hashes from the frozen folder's manifest, not read again)."""
    checkpoint = Path(checkpoint)
    shared = checkpoint.parent / FROZEN
    if not (shared / MANIFEST).is_file():
        tmp = checkpoint.parent / f".tmp-{FROZEN}"
        for old in (tmp, shared):  # a crash's leftovers: a frozen folder is final only with its manifest
            if old.exists():
                shutil.rmtree(old)
        tmp.mkdir(parents=True)
        write_parts(tmp)
        if not (tmp / "model_index.json").is_file():
            raise CheckpointError(f"{tmp}: the frozen parts were written without a model_index.json")
        write_manifest(tmp, {})
        tmp.rename(shared)
    files = json.loads((shared / MANIFEST).read_text())["files"]
    written = {"model_index.json": write_bytes_hashed(checkpoint / "model_index.json",
                                                      (shared / "model_index.json").read_bytes())}
    for part in sorted({rel.split("/")[0] for rel in files if "/" in rel}):
        if (checkpoint / part).exists():
            raise CheckpointError(f"checkpoint {checkpoint}: {part}/ is both trained and frozen")
        (checkpoint / part).symlink_to(Path("..") / FROZEN / part, target_is_directory=True)
    written.update((rel, entry) for rel, entry in files.items() if "/" in rel)
    return written


def write_manifest(folder: Path, written: dict[str, dict]) -> dict:
    """MANIFEST.json for every file under `folder`: the entries in `written` (hashed while written),
    and for a file not in it (one a library wrote by itself, e.g. DeepSpeed's `latest`) its entry
    from disk. A written entry whose size no longer matches the file raises CheckpointError."""
    files = {}
    for p in _files(folder):
        if p.name == MANIFEST and p.parent == folder:
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
            link = folder / rel.split("/")[0]
            via = f" (through the link {link.name} -> {os.readlink(link)})" if link.is_symlink() else ""
            raise CheckpointError(f"checkpoint {folder}: {rel} is missing{via}")
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
