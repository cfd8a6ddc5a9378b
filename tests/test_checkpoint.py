"""softpo.checkpoint: atomic directories with a manifest; what a crash, a corrupt file or a full
disk leaves behind.

`save_state(dir)` is a stand-in for Accelerate's: it writes two files whose contents depend on the
step, so each checkpoint is distinguishable. The end-to-end versions (a real `kill -9` of
`softpo train`, a real write failure from the file-size limit) are in tests/test_kill_resume.py
and tests/test_reliability.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from softpo import checkpoint
from softpo.checkpoint import (MANIFEST, STATE, CheckpointError, is_complete, latest_complete,
                               read_state, save, step_dir)

ROOT = Path(__file__).resolve().parents[1]


def writer(step: int):
    def save_state(d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors").write_bytes(bytes([step % 256]) * (100 + step))
        (d / "sub").mkdir(exist_ok=True)
        (d / "sub" / "optimizer.bin").write_bytes(b"adam" * step)
    return save_state


def save_step(root: Path, step: int, keep: int = 3) -> Path:
    return save(root, step, writer(step), {"step": step}, keep)


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    d = save_step(tmp_path, 7)
    assert d == tmp_path / "step-0000007" == step_dir(tmp_path, 7)
    manifest = json.loads((d / MANIFEST).read_text())
    assert manifest["step"] == 7
    assert sorted(manifest["files"]) == ["model.safetensors", "sub/optimizer.bin", STATE]
    body = bytes([7]) * 107
    assert manifest["files"]["model.safetensors"] == {
        "bytes": 107, "sha256": hashlib.sha256(body).hexdigest()}
    assert read_state(d) == {"step": 7}
    assert is_complete(d)
    assert [p.name for p in tmp_path.iterdir()] == ["step-0000007"]  # no .tmp-* left behind


def test_debris_of_a_killed_save_is_ignored_then_removed(tmp_path):
    """A kill during a save leaves `.tmp-step-*` (never a `step-*` without its manifest)."""
    save_step(tmp_path, 2)
    debris = tmp_path / ".tmp-step-0000004"
    writer(4)(debris)  # the state was written, the manifest and the rename never happened
    assert latest_complete(tmp_path) == tmp_path / "step-0000002"
    save_step(tmp_path, 6)
    assert not debris.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000002", "step-0000006"]


def test_directories_without_a_valid_manifest_are_ignored(tmp_path):
    save_step(tmp_path, 2)
    writer(4)(tmp_path / "step-0000004")  # no manifest at all
    writer(6)(tmp_path / "step-0000006")
    (tmp_path / "step-0000006" / MANIFEST).write_text("{not json")
    (tmp_path / "step-0000008").write_text("a file, not a directory")
    assert not is_complete(tmp_path / "step-0000004")
    assert not is_complete(tmp_path / "step-0000006")
    assert latest_complete(tmp_path) == tmp_path / "step-0000002"
    assert latest_complete(tmp_path / "nowhere") is None


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate", "delete", "extra_bytes"])
def test_a_corrupt_file_is_caught_by_its_hash_and_the_previous_checkpoint_used(tmp_path, damage):
    """Flipping one byte keeps the size, so only the SHA-256 can tell."""
    save_step(tmp_path, 2)
    newest = save_step(tmp_path, 4)
    target = newest / "model.safetensors"
    body = bytearray(target.read_bytes())
    if damage == "flip_a_byte":
        body[50] ^= 0xFF
        target.write_bytes(bytes(body))
    elif damage == "truncate":
        target.write_bytes(bytes(body[:-1]))
    elif damage == "delete":
        target.unlink()
    else:
        target.write_bytes(bytes(body) + b"\0")
    assert not is_complete(newest)
    assert latest_complete(tmp_path) == tmp_path / "step-0000002"


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        save_step(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000003", "step-0000004"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_step(tmp_path, 3)
    d = save(tmp_path, 3, writer(5), {"step": 3, "again": True}, keep=3)
    assert is_complete(d) and read_state(d) == {"step": 3, "again": True}
    assert (d / "model.safetensors").read_bytes() == bytes([5]) * 105


class SafetensorLikeError(Exception):
    """safetensors raises its own exception type (not OSError) on a failed write; torch.save a
    RuntimeError."""


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                   SafetensorLikeError("I/O error: File too large (os error 27)"),
                                   RuntimeError("PytorchStreamWriter failed writing file")])
def test_failed_write_keeps_the_previous_checkpoint_and_says_so(tmp_path, error):
    save_step(tmp_path, 2)

    def full_disk(d: Path) -> None:
        writer(4)(d)  # half the state is written, then the disk is full
        raise error

    with pytest.raises(CheckpointError) as info:
        save(tmp_path, 4, full_disk, {"step": 4}, keep=1)
    message = str(info.value)
    assert message.startswith("could not write checkpoint for step 4: ")
    assert message.endswith(f"; the previous checkpoint {tmp_path / 'step-0000002'} is intact")
    reason = os.strerror(errno.ENOSPC) if isinstance(error, OSError) else str(error)
    assert reason in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000002"]  # tmp removed, no prune
    assert is_complete(tmp_path / "step-0000002")


def test_failure_while_writing_the_manifest_keeps_the_previous(tmp_path, monkeypatch):
    save_step(tmp_path, 2)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "write_manifest", no_space)
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint "
                                              ".*step-0000002 is intact"):
        save_step(tmp_path, 4, keep=1)
    assert latest_complete(tmp_path) == tmp_path / "step-0000002"
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "step-0000004").exists()


def test_failed_first_write_says_there_is_no_previous(tmp_path):
    def broken(d: Path) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.raises(CheckpointError) as info:
        save(tmp_path, 1, broken, {}, keep=1)
    assert str(info.value) == "could not write checkpoint for step 1: Input/output error"


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                    reason="RLIMIT_FSIZE/SIGXFSZ behaviour is Linux-specific")
def test_a_real_write_failure_from_the_file_size_limit(tmp_path):
    """Not a mock: the kernel refuses writes past RLIMIT_FSIZE (EFBIG), as a full disk would."""
    script = f"""
import resource, signal, sys
from pathlib import Path
from softpo import checkpoint

root = Path({str(tmp_path)!r})

def state(step, size):
    def save_state(d):
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors").write_bytes(b"w" * size)
    return save_state

checkpoint.save(root, 2, state(2, 1000), {{"step": 2}}, keep=1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
try:
    checkpoint.save(root, 4, state(4, 50000), {{"step": 4}}, keep=1)
except checkpoint.CheckpointError as e:
    print(e)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (f"could not write checkpoint for step 4: File too large; the "
                                   f"previous checkpoint {tmp_path / 'step-0000002'} is intact")
    assert latest_complete(tmp_path) == tmp_path / "step-0000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000002"]
