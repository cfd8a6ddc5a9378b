"""Crash-safe checkpoints: written to a temporary directory, then renamed into place.

A checkpoint `checkpoints/step-000050/` holds Accelerate's state (model weights as safetensors,
optimiser, scheduler, RNG states), `trainer_state.json`, and `manifest.json`, written last, listing
every file with its size and SHA-256. A directory without a valid manifest is incomplete and ignored
(a kill during a save leaves only `.tmp-*` debris, removed at the next save). A failed write (a full
disk, say) leaves the previous checkpoint in place and raises `CheckpointError` saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""

    pass


def step_dir(root: Path, step: int) -> Path:
    """The folder of the checkpoint of step `step`."""
    return root / f"step-{step:07d}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, step: int) -> None:
    """List every file of `directory` with its size and SHA-256 (written last)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
               for p in files}
    write_json_atomic(directory / MANIFEST, {"step": step, "files": entries})


def is_complete(directory: Path) -> bool:
    """True when the manifest exists and every listed file has its size and hash."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        return all((directory / name).stat().st_size == e["bytes"] and sha256(directory / name) ==
                   e["sha256"] for name, e in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def latest_complete(root: Path) -> Path | None:
    """The newest checkpoint whose manifest checks out, or None."""
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    return next((p for p in candidates if is_complete(p)), None)


def save(root: Path, step: int, save_state, trainer_state: dict[str, Any], keep: int,
         is_main: bool = True, barrier=lambda: None) -> Path:
    """Write a checkpoint atomically. `save_state(dir)` writes the framework state into `dir`.

    In multi-process runs every process calls this (each writes its own RNG state); the main process
    writes the manifest and renames the directory into place.
    """
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    error: Exception | None = None
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        for debris in root.glob(".tmp-*"):
            shutil.rmtree(debris, ignore_errors=True)
    barrier()
    try:
        save_state(tmp)
    except Exception as e:  # a full disk: OSError, or SafetensorError / RuntimeError from libraries
        error = e
    barrier()
    if is_main and error is None:
        try:
            write_json_atomic(tmp / STATE, trainer_state)
            write_manifest(tmp, step)
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            prune(root, keep)
        except Exception as e:
            error = e
    barrier()
    if error is not None:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_complete(root)
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        reason = getattr(error, "strerror", None) or f"{type(error).__name__}: {error}"
        raise CheckpointError(f"could not write checkpoint for step {step}: "
                              f"{reason}{kept}") from None
    return final


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints (keep 0: keep all)."""
    complete = sorted(p for p in root.glob("step-*") if (p / MANIFEST).is_file())
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def read_state(directory: Path) -> dict[str, Any]:
    """The trainer state saved with a checkpoint."""
    return json.loads((directory / STATE).read_text())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary sibling, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
