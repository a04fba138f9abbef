"""Embedded byte-level corpus: the running Python's standard-library ``.py`` sources.

Invariants (tested in ``tests/unit/test_data.py``):

* **Files.** Every ``*.py`` file under the root (default
  ``sysconfig.get_paths()["stdlib"]``), except those under a directory named in
  :data:`SKIP_DIRS` (third-party packages and the stdlib's own test suites, which are
  huge and repetitive). Ordered by POSIX relative path, so the order does not depend
  on the file system.
* **Split.** A file belongs to the eval split iff
  ``sha1(relative_path) / 2**64 < eval_fraction`` (first 8 bytes, big-endian). It is a
  pure function of the path: the same on every run, machine and process, and no file is
  in both splits. ``hash()`` is never used (it is salted per process).
* **Bytes.** Each split is its files' bytes concatenated in path order and cut at its
  budget: ``round(max_corpus_bytes * eval_fraction)`` bytes for eval, the rest for
  train. Tokens are the bytes themselves (vocabulary 256).
* **Batches.** Step ``s`` of the training stream is a *global* batch of windows of
  ``seq_len + 1`` bytes whose start offsets are drawn with a ``torch.Generator`` seeded
  from ``(seed, s)`` only. The batch for step ``s`` therefore does not depend on which
  steps were drawn before, on the process, or on the world size; a data-parallel rank
  ``k`` of ``W`` takes the ``k``-th contiguous slice (:func:`rank_slice`).
* **Eval set.** ``eval_batches * batch_size`` windows at evenly spaced, non-random
  offsets that span the whole eval split; identical for every run with the same data
  config.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from plumage_ds.config import DataConfig
from plumage_ds.estimators.sampling import derive_seed

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
"""Directory names whose ``.py`` files are not part of the corpus."""

_TRAIN_STREAM = 0x7A11  # domain tag mixed into the batch seeds of the training stream


def default_root() -> str:
    """The running interpreter's standard-library directory."""
    return sysconfig.get_paths()["stdlib"]


def list_sources(root: str | os.PathLike) -> list[str]:
    """POSIX relative paths of the corpus files under ``root``, sorted.

    Raises ``ValueError`` naming ``root`` when it holds no eligible ``.py`` file.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"Invalid data root={str(root)!r}: not a directory")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                paths.append(Path(dirpath, name).relative_to(root).as_posix())
    if not paths:
        raise ValueError(f"Invalid data root={str(root)!r}: no .py files outside {sorted(SKIP_DIRS)}")
    return sorted(paths)


def is_eval_file(rel_path: str, eval_fraction: float) -> bool:
    """Stable split rule: ``sha1(rel_path)`` read as a fraction of 2**64, vs ``eval_fraction``."""
    digest = hashlib.sha1(rel_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction


def split_files(paths: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """``(train, eval)`` lists, each in the order of ``paths``; disjoint, union = ``paths``."""
    train, evals = [], []
    for p in paths:
        (evals if is_eval_file(p, eval_fraction) else train).append(p)
    return train, evals


def _concat(root: Path, paths: list[str], budget: int) -> tuple[bytes, list[str]]:
    """Concatenate files in order until ``budget`` bytes; return bytes and files used."""
    parts, used, size = [], [], 0
    for p in paths:
        if size >= budget:
            break
        data = (root / p).read_bytes()
        parts.append(data[: budget - size])
        used.append(p)
        size += len(parts[-1])
    return b"".join(parts), used


@dataclass(frozen=True)
class Corpus:
    """The two splits as uint8 token tensors, plus provenance for ``summary.json``."""

    root: str
    train_tokens: Tensor
    eval_tokens: Tensor
    train_files: tuple[str, ...]
    eval_files: tuple[str, ...]

    def describe(self) -> dict:
        """Plain-data description; ``sha1`` changes iff the token bytes change."""
        h = hashlib.sha1()
        h.update(self.train_tokens.numpy().tobytes())
        h.update(b"\0eval\0")
        h.update(self.eval_tokens.numpy().tobytes())
        return {
            "root": self.root,
            "train_files": len(self.train_files),
            "eval_files": len(self.eval_files),
            "train_bytes": int(self.train_tokens.numel()),
            "eval_bytes": int(self.eval_tokens.numel()),
            "sha1": h.hexdigest(),
        }


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read and split the corpus described by ``cfg`` (see the module docstring)."""
    root = Path(cfg.root if cfg.root is not None else default_root())
    train_paths, eval_paths = split_files(list_sources(root), cfg.eval_fraction)
    eval_budget = max(1, round(cfg.max_corpus_bytes * cfg.eval_fraction))
    train_budget = cfg.max_corpus_bytes - eval_budget
    train_bytes, train_used = _concat(root, train_paths, train_budget)
    eval_bytes, eval_used = _concat(root, eval_paths, eval_budget)
    window = cfg.seq_len + 1
    for split, data in (("train", train_bytes), ("eval", eval_bytes)):
        if len(data) < window:
            raise ValueError(
                f"Invalid max_corpus_bytes={cfg.max_corpus_bytes}: the {split} split has "
                f"{len(data)} bytes, fewer than seq_len+1={window} (root={str(root)!r}, "
                f"eval_fraction={cfg.eval_fraction})"
            )

    def as_tensor(data: bytes) -> Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    return Corpus(
        root=str(root),
        train_tokens=as_tensor(train_bytes),
        eval_tokens=as_tensor(eval_bytes),
        train_files=tuple(train_used),
        eval_files=tuple(eval_used),
    )


def windows(tokens: Tensor, starts: Tensor, seq_len: int) -> Tensor:
    """``(len(starts), seq_len + 1)`` int64 windows ``tokens[s : s + seq_len + 1]``."""
    offsets = starts.view(-1, 1) + torch.arange(seq_len + 1).view(1, -1)
    return tokens[offsets].long()


class BatchStream:
    """Deterministic training batches and the fixed eval set of one :class:`Corpus`.

    ``global_batch(step, n)`` is a pure function of ``(seed, step, n)`` and the corpus.
    """

    def __init__(self, corpus: Corpus, cfg: DataConfig, *, seed: int) -> None:
        self.corpus = corpus
        self.seq_len = cfg.seq_len
        self.batch_size = cfg.batch_size
        self.seed = int(seed)

    def global_batch(self, step: int, n: int) -> Tensor:
        """``n`` training windows for optimizer step ``step``: int64 ``(n, seq_len + 1)``.

        Inputs are ``[:, :-1]`` and targets ``[:, 1:]``. Drawn with a generator seeded
        from ``(seed, step)`` only, so any step can be regenerated in isolation.
        """
        if step < 0 or n <= 0:
            raise ValueError(f"Invalid {step=} or {n=}: need step >= 0 and n > 0")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(derive_seed(_TRAIN_STREAM, self.seed, step))
        high = self.corpus.train_tokens.numel() - self.seq_len  # exclusive bound for starts
        starts = torch.randint(0, high, (n,), generator=gen)
        return windows(self.corpus.train_tokens, starts, self.seq_len)

    def micro_batches(self, step: int, grad_accum: int, *, rank: int = 0, world_size: int = 1) -> list[Tensor]:
        """The micro-batches this rank runs for ``step``.

        The global batch has ``batch_size * grad_accum * world_size`` windows; rank ``k``
        takes slice ``k`` (:func:`rank_slice`) and splits it into ``grad_accum`` chunks of
        ``batch_size``. With ``world_size=1`` this is the whole global batch.
        """
        batch = self.global_batch(step, self.batch_size * grad_accum * world_size)
        return list(rank_slice(batch, rank, world_size).split(self.batch_size))

    def eval_set(self, eval_batches: int) -> list[Tensor]:
        """``eval_batches`` batches of ``batch_size`` windows at evenly spaced offsets."""
        n = eval_batches * self.batch_size
        high = self.corpus.eval_tokens.numel() - self.seq_len - 1  # last valid start
        starts = torch.linspace(0, high, n, dtype=torch.float64).round().long()
        return list(windows(self.corpus.eval_tokens, starts, self.seq_len).split(self.batch_size))


def rank_slice(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """Contiguous slice ``rank`` of ``world_size`` equal slices of ``batch`` (dim 0)."""
    if not 0 <= rank < world_size or batch.shape[0] % world_size:
        raise ValueError(
            f"Invalid {rank=}/{world_size=} for a batch of {batch.shape[0]}: "
            "need 0 <= rank < world_size dividing the batch"
        )
    per = batch.shape[0] // world_size
    return batch[rank * per : (rank + 1) * per]
