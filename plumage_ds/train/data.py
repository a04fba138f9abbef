"""Corpora for the main job: where documents come from, how they split, how they become tokens.

Sources (``data.source``):

* ``stdlib`` (default) — the running interpreter's standard-library ``.py`` sources
  (``data.path`` overrides the root), except directories named in :data:`SKIP_DIRS`
  (third-party packages and the stdlib's own test suites, which are huge and repetitive);
* ``text`` — a folder (searched recursively for files ending in ``data.extensions``) or a glob;
* ``jsonl`` — a JSON-lines file, a folder of ``*.jsonl`` files or a glob; each line is an object
  whose ``data.field`` is one document;
* ``hf_dataset`` — a ``datasets`` dataset saved with ``save_to_disk`` (the ``data.split`` of a
  ``DatasetDict``); column ``data.field`` is one document per row.

Invariants (tested in ``tests/unit/test_data.py`` and ``tests/unit/test_sources.py``):

* **Order.** Files are ordered by POSIX relative path (not the file system's listing order);
  records keep their order within a file/dataset.
* **Split.** A document belongs to the eval split iff ``sha1(key) / 2**64 < eval_fraction``
  (first 8 bytes, big-endian), where ``key`` is the file's relative path (``stdlib``, ``text``)
  or the record's text (``jsonl``, ``hf_dataset``; so duplicated records never straddle the
  split). A pure function of the key: the same on every run, machine and process, and no
  document is in both splits. ``hash()`` is never used (it is salted per process).
* **Tails.** When that leaves the eval split short of one window (a few documents, none hashed
  below ``eval_fraction``) and its budget unfilled, the split is redone by position instead: each
  document's last ``ceil(eval_fraction * size)`` bytes (moved to a UTF-8 character boundary) go to
  eval, the rest to train (:attr:`Corpus.split` ``"tails"``, :attr:`Corpus.note` says so). Still a
  pure function of the documents.
* **Held-out split.** A saved ``DatasetDict`` with an ``eval_split`` (``data.eval_split``, default
  its ``validation`` split when it has one) gives eval that split's rows and train all of
  ``data.split``'s (:attr:`Corpus.split` ``"dataset:<name>"``).
* **Bytes.** Each split is its documents' UTF-8 bytes concatenated in order (records end with a
  newline) and cut at its budget: ``round(max_corpus_bytes * eval_fraction)`` bytes for eval,
  the rest for train.
* **Tokens.** ``data.tokenizer: byte`` — the bytes themselves (vocabulary 256, ``uint8``);
  otherwise a directory with a ``tokenizer.json`` (the ``tokenizers`` library) encodes each
  split's text (``int32`` ids, vocabulary from the tokenizer).
* **Batches.** Step ``s`` of the training stream is a *global* batch of windows of
  ``seq_len + 1`` tokens whose start offsets are drawn with a ``torch.Generator`` seeded
  from ``(seed, s)`` only. The batch for step ``s`` therefore does not depend on which
  steps were drawn before, on the process, or on the world size; a data-parallel rank
  ``k`` of ``W`` takes the ``k``-th contiguous slice (:func:`rank_slice`).
* **Eval set.** ``eval_batches * batch_size`` windows at evenly spaced, non-random
  offsets that span the whole eval split; identical for every run with the same data
  config.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from plumage_ds.config import ConfigError, DataConfig
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
        raise ConfigError("data.path", str(root), "not a directory")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                paths.append(Path(dirpath, name).relative_to(root).as_posix())
    if not paths:
        raise ConfigError("data.path", str(root), f"no .py files outside {sorted(SKIP_DIRS)}")
    return sorted(paths)


def is_eval_file(key: str, eval_fraction: float) -> bool:
    """Stable split rule: ``sha1(key)`` read as a fraction of 2**64, vs ``eval_fraction``.

    ``key`` is a file's relative path or a record's text (see the module docstring)."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction


def split_files(paths: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """``(train, eval)`` lists, each in the order of ``paths``; disjoint, union = ``paths``."""
    train, evals = [], []
    for p in paths:
        (evals if is_eval_file(p, eval_fraction) else train).append(p)
    return train, evals


@dataclass(frozen=True)
class Document:
    """One document: its split ``key`` and a function returning its bytes (read lazily)."""

    key: str
    read: Callable[[], bytes]


def _file_documents(root: Path, paths: list[str]) -> list[Document]:
    return [Document(p, (lambda p=p: (root / p).read_bytes())) for p in paths]


def list_text_files(path: str, extensions: tuple[str, ...]) -> tuple[Path, list[str]]:
    """``(base, relative paths)`` of a ``text`` source: a folder (recursive, by extension) or a glob.

    Relative paths are POSIX, sorted, relative to the folder (or to the glob's fixed prefix).
    """
    p = Path(path)
    if p.is_dir():
        base = p
        files = [f for f in p.rglob("*") if f.is_file() and f.name.endswith(tuple(extensions))]
        what = f"no files ending in {list(extensions)}"
    else:
        if not glob.has_magic(path):
            raise ConfigError("data.path", path, "no such folder, and not a glob pattern")
        fixed = Path(path.split("*")[0].split("?")[0].split("[")[0])
        base = fixed if fixed.is_dir() else fixed.parent
        files = [Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file()]
        what = "the glob matches no file"
    if not files:
        raise ConfigError("data.path", path, what)
    return base, sorted(f.relative_to(base).as_posix() for f in files)


def _jsonl_files(path: str) -> tuple[Path, list[str]]:
    p = Path(path)
    if p.is_file():
        return p.parent, [p.name]
    if p.is_dir():
        return list_text_files(path, (".jsonl",))
    return list_text_files(path, ())


def _record_text(record, field_name: str, where: str) -> str:
    if not isinstance(record, dict) or field_name not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ConfigError("data.field", field_name, f"missing in {where} (has {keys})")
    text = record[field_name]
    if not isinstance(text, str):
        raise ConfigError("data.field", field_name, f"{where}: value is {type(text).__name__}, not text")
    return text


def _record_documents(texts: Iterator[str]) -> Iterator[Document]:
    for text in texts:
        data = (text + "\n").encode("utf-8")
        yield Document(text, (lambda d=data: d))


def _jsonl_texts(base: Path, files: list[str], field_name: str) -> Iterator[str]:
    for rel in files:
        with open(base / rel, "rb") as fh:
            for i, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ConfigError(
                        "data.path", str(base / rel), f"line {i} is not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                    ) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError("data.path", str(base / rel), f"line {i} is not JSON ({err.msg})") from None
                yield _record_text(record, field_name, f"{rel} line {i}")


def _load_hf(cfg: DataConfig):
    """``(dataset of data.split, dataset of the eval split or None, its name)`` of a ``save_to_disk`` directory."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "data.source", "hf_dataset", "needs the 'datasets' package (pip install 'plumage_ds[data]')"
        ) from None
    try:
        ds = datasets.load_from_disk(cfg.path)
    except FileNotFoundError as err:
        raise ConfigError("data.path", cfg.path, f"not a dataset saved with save_to_disk ({err})") from None
    if not isinstance(ds, datasets.DatasetDict):
        if cfg.eval_split is not None:
            raise ConfigError("data.eval_split", cfg.eval_split, f"{cfg.path} is one Dataset, not a DatasetDict with splits")
        return ds, None, None
    if cfg.split not in ds:
        raise ConfigError("data.split", cfg.split, f"not in the saved DatasetDict (splits: {sorted(ds)})")
    name = cfg.eval_split if cfg.eval_split is not None else ("validation" if cfg.split != "validation" else None)
    if cfg.eval_split is not None and name not in ds:
        raise ConfigError("data.eval_split", name, f"not in the saved DatasetDict (splits: {sorted(ds)})")
    return ds[cfg.split], (ds[name] if name in ds else None), name


def _hf_texts(ds, cfg: DataConfig) -> Iterator[str]:
    if cfg.field not in ds.column_names:
        raise ConfigError("data.field", cfg.field, f"not a column of {cfg.path} (columns: {ds.column_names})")
    for start in range(0, len(ds), 1024):
        for i, text in enumerate(ds[start : start + 1024][cfg.field]):
            if not isinstance(text, str):
                raise ConfigError("data.field", cfg.field, f"row {start + i}: value is {type(text).__name__}, not text")
            yield text


def held_out_documents(cfg: DataConfig) -> tuple[Optional[str], Optional[Iterator[Document]]]:
    """``(name, documents)`` of a ``DatasetDict``'s eval split (:func:`_load_hf`), or ``(None, None)``."""
    if cfg.source != "hf_dataset":
        return None, None
    _, held_out, name = _load_hf(cfg)
    return (name, _record_documents(_hf_texts(held_out, cfg))) if held_out is not None else (None, None)


def documents(cfg: DataConfig) -> tuple[str, Iterator[Document]]:
    """``(description of the source, documents in corpus order)`` for ``cfg.source``."""
    if cfg.source == "stdlib":
        root = Path(cfg.path if cfg.path is not None else default_root())
        return str(root), iter(_file_documents(root, list_sources(root)))
    if cfg.source == "text":
        base, files = list_text_files(cfg.path, cfg.extensions)
        return cfg.path, iter(_file_documents(base, files))
    if cfg.source == "jsonl":
        base, files = _jsonl_files(cfg.path)
        return cfg.path, _record_documents(_jsonl_texts(base, files, cfg.field))
    if cfg.source == "hf_dataset":
        return cfg.path, _record_documents(_hf_texts(_load_hf(cfg)[0], cfg))
    raise ConfigError("data.source", cfg.source, "unknown source")


def _fill(docs: Iterator[Document], budgets: tuple[int, int], pieces) -> tuple[tuple[bytes, bytes], tuple[list[str], list[str]]]:
    """Concatenate documents into the (train, eval) splits until each budget is full; ``pieces(doc, open)``
    gives a document's ``(split, bytes)`` pieces (``open[k]``: split ``k`` still takes bytes)."""
    parts: tuple[list[bytes], list[bytes]] = ([], [])
    used: tuple[list[str], list[str]] = ([], [])
    size = [0, 0]
    for doc in docs:
        if size[0] >= budgets[0] and size[1] >= budgets[1]:
            break
        for k, piece in pieces(doc, [size[0] < budgets[0], size[1] < budgets[1]]):
            if size[k] < budgets[k]:
                parts[k].append(piece[: budgets[k] - size[k]])
                used[k].append(doc.key if len(doc.key) <= 200 else doc.key[:200])
                size[k] += len(parts[k][-1])
    return (b"".join(parts[0]), b"".join(parts[1])), used


def _fill_splits(docs: Iterator[Document], eval_fraction: float, budgets: tuple[int, int]):
    """Whole documents to the split their key hashes to (:func:`is_eval_file`), until each budget is full."""

    def by_hash(doc: Document, open_: list[bool]) -> list[tuple[int, bytes]]:
        k = 1 if is_eval_file(doc.key, eval_fraction) else 0
        return [(k, doc.read())] if open_[k] else []  # a full split's documents are never read

    return _fill(docs, budgets, by_hash)


def _tail_start(data: bytes, eval_fraction: float) -> int:
    """Where a document's eval tail starts: its last ``ceil(eval_fraction * len)`` bytes, moved back to
    the start of a UTF-8 character (never inside a multi-byte sequence)."""
    cut = len(data) - math.ceil(eval_fraction * len(data))
    while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut


def _fill_tails(docs: Iterator[Document], eval_fraction: float, budgets: tuple[int, int]):
    """(train, eval) from every document's head and tail (:func:`_tail_start`) until each budget is full."""

    def head_and_tail(doc: Document, open_: list[bool]) -> list[tuple[int, bytes]]:
        data = doc.read()
        cut = _tail_start(data, eval_fraction)
        return [(k, piece) for k, piece in ((0, data[:cut]), (1, data[cut:])) if piece]

    return _fill(docs, budgets, head_and_tail)


def _fill_one(docs: Iterator[Document], budget: int) -> tuple[bytes, list[str]]:
    """Documents concatenated in order until ``budget`` bytes."""
    parts, used, size = [], [], 0
    for doc in docs:
        if size >= budget:
            break
        parts.append(doc.read()[: budget - size])
        used.append(doc.key if len(doc.key) <= 200 else doc.key[:200])
        size += len(parts[-1])
    return b"".join(parts), used


# --------------------------------------------------------------------------- tokenizers


class Tokenizer:
    """``byte`` (ids = bytes, vocabulary 256) or a ``tokenizer.json`` directory."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._tok = None
        if spec == "byte":
            self.vocab_size = 256
            return
        path = Path(spec)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError("data.tokenizer", spec, "must be 'byte' or a directory with a tokenizer.json")
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises its own Exception type
            raise ConfigError("data.tokenizer", spec, f"cannot load {file} ({err})") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.file = file

    def encode(self, data: bytes) -> Tensor:
        """Token ids of ``data``: ``uint8`` bytes, or ``int32`` ids of its UTF-8 text."""
        if self._tok is None:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        ids = self._tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False).ids
        return torch.tensor(ids, dtype=torch.int32)


@dataclass(frozen=True)
class Corpus:
    """The two splits as token tensors, plus provenance for ``summary.json``."""

    root: str
    train_tokens: Tensor
    eval_tokens: Tensor
    train_files: tuple[str, ...]
    eval_files: tuple[str, ...]
    source: str = "stdlib"
    tokenizer: str = "byte"
    vocab_size: int = 256
    bytes_read: tuple[int, int] = field(default=(0, 0))
    split: str = "hash"
    """How eval was chosen: ``"hash"`` (whole documents by key), ``"tails"`` (each document's tail),
    ``"dataset:<name>"`` (a ``DatasetDict`` split)."""
    note: Optional[str] = None
    """One line for the log when the split is not the hash rule the config asks for (``"tails"``)."""

    def describe(self) -> dict:
        """Plain-data description; ``sha1`` changes iff the token ids change."""
        h = hashlib.sha1()
        h.update(self.train_tokens.numpy().tobytes())
        h.update(b"\0eval\0")
        h.update(self.eval_tokens.numpy().tobytes())
        return {
            "source": self.source,
            "root": self.root,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
            "split": self.split,
            "train_files": len(self.train_files),
            "eval_files": len(self.eval_files),
            "train_bytes": self.bytes_read[0],
            "eval_bytes": self.bytes_read[1],
            "train_tokens": int(self.train_tokens.numel()),
            "eval_tokens": int(self.eval_tokens.numel()),
            "sha1": h.hexdigest(),
        }


def load_corpus(cfg: DataConfig, tokenizer: Optional[Tokenizer] = None) -> Corpus:
    """Read, split and tokenize the corpus described by ``cfg`` (see the module docstring).

    A split shorter than one window (``seq_len + 1`` tokens) is a :class:`ConfigError` naming its
    real cause: ``data.max_corpus_bytes`` when the budget cut it, ``data.eval_fraction`` when even
    the documents' tails are too short, ``data.eval_split`` for a held-out split, else ``data.path``
    (the corpus itself is that small)."""
    tokenizer = tokenizer if tokenizer is not None else Tokenizer(cfg.tokenizer)
    where, docs = documents(cfg)
    eval_budget = max(1, round(cfg.max_corpus_bytes * cfg.eval_fraction))
    budgets = (cfg.max_corpus_bytes - eval_budget, eval_budget)
    window = cfg.seq_len + 1
    held_out, eval_docs = held_out_documents(cfg)
    note = None
    if eval_docs is not None:
        split = f"dataset:{held_out}"
        (train_bytes, train_used), (eval_bytes, eval_used) = _fill_one(docs, budgets[0]), _fill_one(eval_docs, budgets[1])
    else:
        split, seen = "hash", []
        counted = (seen.append(d) or d for d in docs)  # an eval budget left unfilled means every document was seen
        (train_bytes, eval_bytes), (train_used, eval_used) = _fill_splits(counted, cfg.eval_fraction, budgets)
        if len(eval_bytes) < budgets[1] and tokenizer.encode(eval_bytes).numel() < window:
            hashed = len(eval_used)
            split = "tails"
            (train_bytes, eval_bytes), (train_used, eval_used) = _fill_tails(documents(cfg)[1], cfg.eval_fraction, budgets)
            note = (
                f"data: {'no' if not hashed else f'only {hashed}'} document of {len(seen)} hashed into the eval split "
                f"(eval_fraction={cfg.eval_fraction}, too little for one window of {window} tokens); eval is the last "
                f"{cfg.eval_fraction:.0%} of every document instead"
            )
    train_tokens, eval_tokens = tokenizer.encode(train_bytes), tokenizer.encode(eval_bytes)
    for k, name, data, toks in ((0, "train", train_bytes, train_tokens), (1, "eval", eval_bytes, eval_tokens)):
        if toks.numel() >= window:
            continue
        short = f"the {name} split has {len(data)} bytes / {toks.numel()} tokens, fewer than seq_len+1={window}"
        where_ = f"source={cfg.source!r}, path={where!r}"
        if len(data) >= budgets[k]:
            raise ConfigError(
                "data.max_corpus_bytes", cfg.max_corpus_bytes,
                f"{short}: its share of the budget is {budgets[k]} bytes (eval_fraction={cfg.eval_fraction}; {where_})",
            )  # fmt: skip
        if name == "eval" and split == "tails":
            raise ConfigError(
                "data.eval_fraction", cfg.eval_fraction,
                f"{short}: {'no' if not hashed else f'only {hashed}'} document of {len(seen)} hashed into it, and their last {cfg.eval_fraction:.0%} "
                f"hold only {len(data)} bytes; raise data.eval_fraction or lower data.seq_len ({where_})",
            )  # fmt: skip
        if name == "eval" and split != "hash":
            raise ConfigError("data.eval_split", held_out, f"{short}: that is all the split holds ({where_})")
        raise ConfigError(
            "data.path", where, f"{short}: that is all the corpus holds for it ({len(train_used)} documents, {cfg.source!r})"
        )
    return Corpus(
        root=where,
        train_tokens=train_tokens,
        eval_tokens=eval_tokens,
        train_files=tuple(train_used),
        eval_files=tuple(eval_used),
        source=cfg.source,
        tokenizer=cfg.tokenizer,
        vocab_size=tokenizer.vocab_size,
        bytes_read=(len(train_bytes), len(eval_bytes)),
        split=split,
        note=note,
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
