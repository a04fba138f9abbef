"""Durable files: atomic writes and checkpoint directories that are complete or ignored.

Invariants:

* **Atomic files.** Every writer here writes a temporary file next to the target, flushes and
  ``fsync``s it, renames it over the target (``os.replace``, atomic on POSIX) and ``fsync``s the
  directory. A reader sees the old file or the new one, never a torn one, whatever moment a
  ``kill -9`` or a power cut hits.
* **Modes.** What these writers leave behind has the mode a plain ``open()`` would give under the
  process umask (``0644`` files and ``0755`` directories under ``022``), although temporary files
  are created ``0600``.
* **Complete checkpoints.** A checkpoint is a directory ``step_<8 digits>`` under a root; its
  :data:`MANIFEST` is written *last* (atomically) and lists every other file with its size and
  SHA-256. A directory without a valid manifest, or whose files do not have the listed sizes, is
  incomplete: the lookup (:func:`newest_complete`) skips it. :func:`checkpoint_problem` with
  ``content=True`` also compares every file's SHA-256 (what a resume does before loading).
  Digests of files written through this module are taken while writing (no second read);
  manifests of format 1 (sizes only) stay readable, without a content check.
* **Keep-last-k.** :func:`prune` deletes complete checkpoints older than the newest ``k`` and
  incomplete leftovers older than the newest complete one — never the newest complete one.

Nothing here knows about models or optimizers; the main job (:mod:`plumage_ds.train.checkpoint`)
and the DeepSpeed adapter's side files write through it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 2
"""2: ``files`` maps a relative path to ``{"size", "sha256"}``; 1 (older): to the size alone."""
_READABLE_FORMATS = (1, 2)
_CKPT_RE = re.compile(r"^step_(\d{8})$")
_CHUNK = 1 << 20


def umask() -> int:
    """The process umask, read without changing it where ``/proc`` tells it (else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_default(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Give ``path`` the mode ``open()``/``mkdir()`` would have given it under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


# --------------------------------------------------------------------------- content digests

_DIGESTS: dict[str, tuple[int, int, int, str]] = {}
"""Digests taken while this process wrote a file: real path -> (inode, size, mtime_ns, sha256)."""


def _remember_digest(path: str | os.PathLike, hexdigest: str) -> None:
    st = os.stat(path)
    _DIGESTS[os.path.realpath(path)] = (st.st_ino, st.st_size, st.st_mtime_ns, hexdigest)


def cached_sha256(path: str | os.PathLike) -> Optional[str]:
    """The SHA-256 this process computed while writing ``path``, if the file is still that one (same
    inode, size and mtime); else ``None``."""
    entry = _DIGESTS.get(os.path.realpath(path))
    if entry is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return entry[3] if entry[:3] == (st.st_ino, st.st_size, st.st_mtime_ns) else None


def file_sha256(path: str | os.PathLike, *, use_cache: bool = True) -> str:
    """SHA-256 (hex) of the file at ``path``, streamed in 1 MiB chunks (or remembered from writing it)."""
    if use_cache and (known := cached_sha256(path)) is not None:
        return known
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _HashingWriter:
    """A write-only file object that hashes what goes through it (for ``torch.save``)."""

    def __init__(self, fh) -> None:
        self.fh, self.sha256 = fh, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


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
        _chmod_default(tmp)  # mkstemp creates 0600
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
    finds the old directory or the new one, never a half-written one. Every file and directory in
    it gets the umask's default mode (writers that go through a private temporary file leave 0600).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        _chmod_default(tmp, directory=True)  # mkdtemp creates 0700
        yield tmp
        for dirpath, dirnames, files in os.walk(tmp):
            for name in dirnames:
                _chmod_default(Path(dirpath, name), directory=True)
            for name in files:
                _chmod_default(Path(dirpath, name))
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
    _remember_digest(path, hashlib.sha256(data).hexdigest())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kw) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, **dumps_kw) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically (plain tensors/containers: loads with ``weights_only=True``)."""
    import torch

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            writer = _HashingWriter(fh)
            torch.save(obj, writer)
    _remember_digest(path, writer.sha256.hexdigest())


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


def checkpoint_files(ckpt: str | os.PathLike) -> list[str]:
    """POSIX relative paths of the files a manifest of ``ckpt`` lists (not the manifest, temporary or hidden files), sorted."""
    ckpt = Path(ckpt)
    out = []
    for dirpath, _, files in os.walk(ckpt):
        for name in files:
            rel = Path(dirpath, name).relative_to(ckpt).as_posix()
            if rel == MANIFEST or name.endswith(".tmp") or "/." in f"/{rel}":
                continue
            out.append(rel)
    return sorted(out)


def write_manifest(
    ckpt: str | os.PathLike, step: int, meta: Optional[dict] = None, digests: Optional[dict[str, str]] = None
) -> dict:
    """Seal ``ckpt``: list every file in it with its size and SHA-256, then write :data:`MANIFEST` atomically.

    Call it once every file of the checkpoint is durably written (after a barrier when several
    ranks write into it); until then the directory does not count as a checkpoint. ``digests``
    (relative path -> SHA-256) are taken as given (computed by the ranks that wrote or hashed
    the files); any other file is hashed here (or remembered from writing it).
    """
    ckpt = Path(ckpt)
    for dirpath, _, _ in os.walk(ckpt):
        fsync_dir(dirpath)
    digests = digests or {}
    files = {}
    for rel in checkpoint_files(ckpt):
        f = ckpt / rel
        files[rel] = {"size": f.stat().st_size, "sha256": digests.get(rel) or file_sha256(f)}
    manifest = {"format": MANIFEST_FORMAT, "step": int(step), "files": files, "meta": meta or {}}
    atomic_write_json(ckpt / MANIFEST, manifest)
    fsync_dir(ckpt.parent)
    return manifest


def _manifest_entries(manifest: dict) -> Optional[dict[str, tuple[int, Optional[str]]]]:
    """``{relative path: (size, sha256 or None)}`` of a manifest of a readable format; ``None`` if malformed."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return None
    out = {}
    for rel, entry in files.items():
        if manifest["format"] == 1 and isinstance(entry, int):
            out[rel] = (entry, None)
        elif isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str):
            out[rel] = (entry["size"], entry["sha256"])
        else:
            return None
    return out


def _inspect(ckpt: Path, *, content: bool) -> tuple[Optional[dict], Optional[str]]:
    """``(manifest, None)`` if ``ckpt`` is complete (with ``content``: every digest matches too), else ``(None, why)``."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"no {MANIFEST}: its save did not finish"
    except (OSError, ValueError) as err:
        return None, f"{MANIFEST} is unreadable ({type(err).__name__})"
    if not isinstance(manifest, dict) or manifest.get("format") not in _READABLE_FORMATS:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        return None, f"{MANIFEST} has format {fmt!r}, not one of {list(_READABLE_FORMATS)}"
    entries = _manifest_entries(manifest)
    if entries is None:
        return None, f"{MANIFEST} is malformed"
    for rel, (size, _) in entries.items():
        f = ckpt / rel
        if not f.is_file():
            return None, f"{rel} is missing"
        if f.stat().st_size != size:
            return None, f"{rel} has {f.stat().st_size} bytes, its manifest says {size}"
    if content:
        for rel, (_, digest) in entries.items():
            if digest is not None and file_sha256(ckpt / rel, use_cache=False) != digest:
                return None, f"{rel} does not match its SHA-256 in {MANIFEST} (damaged)"
    return manifest, None


def checkpoint_problem(ckpt: str | os.PathLike, *, content: bool = True) -> Optional[str]:
    """Why ``ckpt`` cannot be loaded (no manifest, a file missing, another size; with ``content``
    a file whose SHA-256 differs from its manifest), or ``None`` if it can. Format-1 manifests carry
    no digests: only their sizes are checked."""
    return _inspect(Path(ckpt), content=content)[1]


def read_manifest(ckpt: str | os.PathLike) -> Optional[dict]:
    """The manifest of ``ckpt`` if the checkpoint is complete (every listed file present, same size), else ``None``."""
    return _inspect(Path(ckpt), content=False)[0]


def newest_complete(root: str | os.PathLike) -> Optional[tuple[int, Path]]:
    """``(step, path)`` of the newest complete checkpoint under ``root`` (sizes checked, not content), or ``None``."""
    for step, path in reversed(list_checkpoints(root)):
        manifest = read_manifest(path)
        if manifest is not None and manifest.get("step") == step:
            return step, path
    return None


def newest_verified(root: str | os.PathLike) -> tuple[Optional[tuple[int, Path]], list[tuple[Path, str]]]:
    """``((step, path) or None, skipped)``: the newest checkpoint under ``root`` whose every file has
    its manifest's size and SHA-256, and each newer one skipped with the reason. Only the
    checkpoints up to the one returned are read."""
    skipped: list[tuple[Path, str]] = []
    for step, path in reversed(list_checkpoints(root)):
        manifest, why = _inspect(path, content=True)
        if manifest is not None and manifest.get("step") != step:
            manifest, why = None, f"{MANIFEST} is for step {manifest.get('step')!r}"
        if manifest is not None:
            return (step, path), skipped
        skipped.append((path, why))
    return None, skipped


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
