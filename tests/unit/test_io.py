"""Durable files (:mod:`plumage_ds.io`): atomic writes, modes under the umask, manifests with
content digests written last, keep-last-k."""

from __future__ import annotations

import hashlib
import json
import os
import stat

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
    sha = hashlib.sha256(b"abc").hexdigest()
    assert manifest["files"] == {"sub/w.bin": {"size": 3, "sha256": sha}} and manifest["meta"] == {"note": 2}
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


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["022", "027"])
def test_written_files_follow_the_umask(tmp_path, mask):
    """Temporary files are 0600; what the writers leave has the mode ``open()`` would give."""
    old = os.umask(mask)
    try:
        io.atomic_write_json(tmp_path / "s.json", {"v": 1})
        io.atomic_torch_save({"t": torch.zeros(2)}, tmp_path / "t.pt")
        with io.atomic_path(tmp_path / "fig.png") as tmp:
            tmp.write_bytes(b"png")
        with io.atomic_dir(tmp_path / "model") as d:
            (d / "sub").mkdir(mode=0o700)
            fd = os.open(d / "sub" / "w.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)  # as a private writer would
            os.close(fd)
    finally:
        os.umask(old)
    for f in ("s.json", "t.pt", "fig.png", "model/sub/w.safetensors"):
        assert _mode(tmp_path / f) == 0o666 & ~mask, f
    for d in ("model", "model/sub"):
        assert _mode(tmp_path / d) == 0o777 & ~mask, d
    old = os.umask(mask)
    try:
        assert io.umask() == mask  # read without changing it
        assert os.umask(mask) == mask
    finally:
        os.umask(old)


def test_manifest_digests_catch_flipped_bytes_and_old_manifests_still_load(tmp_path):
    p = _ckpt(tmp_path, 3, payload=b"x" * 100)
    io.atomic_torch_save({"t": torch.arange(10)}, p / "opt.pt")  # digest taken while writing
    io.write_manifest(p, 3)
    files = json.loads((p / io.MANIFEST).read_text())["files"]
    assert files["opt.pt"]["sha256"] == hashlib.sha256((p / "opt.pt").read_bytes()).hexdigest()
    assert io.checkpoint_problem(p) is None and io.newest_verified(tmp_path) == ((3, p), [])
    data = bytearray((p / "sub" / "w.bin").read_bytes())
    data[50] ^= 0xFF  # same size, other content: only the digest can tell
    (p / "sub" / "w.bin").write_bytes(bytes(data))
    assert io.newest_complete(tmp_path) == (3, p)  # sizes still match
    assert io.checkpoint_problem(p) == "sub/w.bin does not match its SHA-256 in MANIFEST.json (damaged)"
    p1 = _ckpt(tmp_path, 1)
    assert io.newest_verified(tmp_path) == ((1, p1), [(p, io.checkpoint_problem(p))])
    (p / "opt.pt").write_bytes(b"short")
    assert io.checkpoint_problem(p, content=False).startswith("opt.pt has 5 bytes, its manifest says ")
    # a format-1 manifest (sizes only, written by older versions) still counts, without a content check
    manifest = json.loads((p1 / io.MANIFEST).read_text())
    manifest.update(format=1, files={k: v["size"] for k, v in manifest["files"].items()})
    (p1 / io.MANIFEST).write_text(json.dumps(manifest))
    (p1 / "sub" / "w.bin").write_bytes(b"xyz")
    assert io.checkpoint_problem(p1) is None
    (p1 / io.MANIFEST).unlink()
    assert io.newest_verified(tmp_path) == (None, [(p, io.checkpoint_problem(p)), (p1, "no MANIFEST.json: its save did not finish")])
