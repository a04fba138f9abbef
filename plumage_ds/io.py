"""Durable files: atomic writes and checkpoint directories that are complete or ignored.

Invariants:

* **Atomic files.** Every writer here writes a temporary file next to the target, flushes and
  ``fsync``s it, renames it over the target (``os.replace``, atomic on POSIX) and ``fsync``s the
  directory. A reader sees the old file or the new one, never a torn one, whatever moment a
  ``kill -9`` or a power cut hits.
* **Complete checkpoints.** A checkpoint is a directory ``step_<8 digits>`` under a root; its
  :data:`MANIFEST` is written *last* (atomically) and lists every other file with its size. A
  directory without a valid manifest, or whose files do not match it, is incomplete: the lookup
  (:func:`newest_complete`) skips it, so the previous complete checkpoint stays the one resumed.
* **Keep-last-k.** :func:`prune` deletes complete checkpoints older than the newest ``k`` and
  incomplete leftovers older than the newest complete one — never the newest complete one.

Nothing here knows about models or optimizers; the main job (:mod:`plumage_ds.train.checkpoint`)
and the DeepSpeed adapter's side files write through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1
_CKPT_RE = re.compile(r"^step_(\d{8})$")


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``.

    For writers that insist on a file name (``torch.save``, safetensors). On an exception the
    temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``path``; on success fsync its files and move it to ``path``.

    An existing ``path`` is replaced (renamed aside first, deleted after the swap), so a reader
    finds the old directory or the new one, never a half-written one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for dirpath, _, files in os.walk(tmp):
            for name in files:
                with open(Path(dirpath, name), "rb+") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(dirpath)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.rmdir(old)
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kw) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, **dumps_kw) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically (plain tensors/containers: loads with ``weights_only=True``)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --------------------------------------------------------------------------- checkpoint directories


def checkpoint_dir(root: str | os.PathLike, step: int) -> Path:
    """``root/step_<8 digits>``."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 10**8:
        raise ValueError(f"Invalid checkpoint {step=}: must be an integer in [0, 1e8)")
    return Path(root) / f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every ``step_*`` directory under ``root`` (complete or not), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _file_sizes(ckpt: Path) -> dict[str, int]:
    sizes = {}
    for dirpath, _, files in os.walk(ckpt):
        for name in files:
            full = Path(dirpath, name)
            rel = full.relative_to(ckpt).as_posix()
            if rel == MANIFEST or name.endswith(".tmp") or "/." in f"/{rel}":
                continue
            sizes[rel] = full.stat().st_size
    return dict(sorted(sizes.items()))


def write_manifest(ckpt: str | os.PathLike, step: int, meta: Optional[dict] = None) -> dict:
    """Seal ``ckpt``: list every file in it with its size, then write :data:`MANIFEST` atomically.

    Call it once every file of the checkpoint is durably written (after a barrier when several
    ranks write into it); until then the directory does not count as a checkpoint.
    """
    ckpt = Path(ckpt)
    for dirpath, _, _ in os.walk(ckpt):
        fsync_dir(dirpath)
    manifest = {"format": MANIFEST_FORMAT, "step": int(step), "files": _file_sizes(ckpt), "meta": meta or {}}
    atomic_write_json(ckpt / MANIFEST, manifest)
    fsync_dir(ckpt.parent)
    return manifest


def read_manifest(ckpt: str | os.PathLike) -> Optional[dict]:
    """The manifest of ``ckpt`` if the checkpoint is complete (every listed file present, same size), else ``None``."""
    ckpt = Path(ckpt)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        return None
    for rel, size in manifest["files"].items():
        f = ckpt / rel
        if not f.is_file() or f.stat().st_size != size:
            return None
    return manifest


def newest_complete(root: str | os.PathLike) -> Optional[tuple[int, Path]]:
    """``(step, path)`` of the newest complete checkpoint under ``root``, or ``None``."""
    for step, path in reversed(list_checkpoints(root)):
        manifest = read_manifest(path)
        if manifest is not None and manifest.get("step") == step:
            return step, path
    return None


def begin_checkpoint(root: str | os.PathLike, step: int) -> Path:
    """An empty directory for the checkpoint of ``step`` (a leftover of a crashed save is removed)."""
    path = checkpoint_dir(root, step)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    fsync_dir(path.parent)
    return path


def prune(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest ``keep_last`` and incomplete ones older
    than the newest complete one; return what was deleted (the newest complete one never is)."""
    if keep_last < 1:
        raise ValueError(f"Invalid {keep_last=}: must be >= 1")
    entries = list_checkpoints(root)
    complete = [(s, p) for s, p in entries if read_manifest(p) is not None]
    if not complete:
        return []
    keep = {p for _, p in complete[-keep_last:]}
    newest = complete[-1][0]
    removed = []
    for step, path in entries:
        if path in keep or step > newest:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        fsync_dir(root)
    return removed
