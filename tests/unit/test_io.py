"""Durable files (:mod:`plumage_ds.io`): atomic writes, manifests written last, keep-last-k."""

from __future__ import annotations

import json
import os

import pytest
import torch

from plumage_ds import io


def test_atomic_writes_leave_no_temp_files_and_keep_old_on_failure(tmp_path):
    path = tmp_path / "a" / "x.json"
    io.atomic_write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(path.parent) == ["x.json"]
    io.atomic_torch_save({"t": torch.arange(3)}, tmp_path / "t.pt")
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["t"], torch.arange(3))
    with io.atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("1")
    with io.atomic_dir(tmp_path / "d") as d:  # replaces the old directory whole
        (d / "g").write_text("2")
    assert sorted(os.listdir(tmp_path / "d")) == ["g"]
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def _ckpt(root, step, complete=True, payload=b"abc"):
    path = io.begin_checkpoint(root, step)
    (path / "sub").mkdir()
    (path / "sub" / "w.bin").write_bytes(payload)
    if complete:
        io.write_manifest(path, step, {"note": step})
    return path


def test_newest_complete_skips_incomplete_and_damaged(tmp_path):
    assert io.newest_complete(tmp_path / "none") is None
    _ckpt(tmp_path, 2)
    p4 = _ckpt(tmp_path, 4)
    _ckpt(tmp_path, 6, complete=False)  # killed before its manifest
    assert io.newest_complete(tmp_path) == (4, p4)
    (p4 / "sub" / "w.bin").write_bytes(b"ab")  # truncated after sealing: no longer complete
    assert io.newest_complete(tmp_path)[0] == 2
    manifest = json.loads((tmp_path / "step_00000002" / io.MANIFEST).read_text())
    assert manifest["files"] == {"sub/w.bin": 3} and manifest["meta"] == {"note": 2}
    with pytest.raises(ValueError, match=r"Invalid checkpoint step=-1"):
        io.checkpoint_dir(tmp_path, -1)


def test_prune_keeps_last_k_complete(tmp_path):
    for s in (1, 2, 3):
        _ckpt(tmp_path, s)
    _ckpt(tmp_path, 0, complete=False)  # an old leftover
    _ckpt(tmp_path, 5, complete=False)  # newer than the newest complete: a save in progress, kept
    removed = io.prune(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["step_00000000", "step_00000001"]
    assert [s for s, _ in io.list_checkpoints(tmp_path)] == [2, 3, 5]
    with pytest.raises(ValueError, match="keep_last=0"):
        io.prune(tmp_path, 0)
