"""Embedded corpus and batches: stable split, reproducible batches, world-size slices."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from plumage_ds.config import DataConfig
from plumage_ds.train.data import (
    SKIP_DIRS,
    BatchStream,
    default_root,
    is_eval_file,
    list_sources,
    load_corpus,
    rank_slice,
    split_files,
)

SMALL = DataConfig(seq_len=16, batch_size=4, max_corpus_bytes=100_000)


@pytest.fixture(scope="module")
def stdlib_sources() -> list[str]:
    return list_sources(default_root())


@pytest.fixture(scope="module")
def stream() -> BatchStream:
    return BatchStream(load_corpus(SMALL), SMALL, seed=0)


@pytest.fixture
def fake_root(tmp_path):
    """A tiny tree with files that must be read and files that must be skipped."""
    files = {
        "b.py": b"print('b')\n" * 20,
        "a.py": b"import os\n" * 20,
        "pkg/mod.py": b"x = 1\n" * 40,
        "pkg/data.txt": b"not python\n",
        "test/test_a.py": b"SKIPPED\n",
        "pkg/tests/test_mod.py": b"SKIPPED\n",
        "site-packages/dep.py": b"SKIPPED\n",
    }
    for rel, data in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return tmp_path


# --------------------------------------------------------------------------- files and split


def test_list_sources_sorted_posix_and_skips(fake_root):
    assert list_sources(fake_root) == ["a.py", "b.py", "pkg/mod.py"]


def test_stdlib_listing_excludes_skip_dirs(stdlib_sources):
    assert len(stdlib_sources) > 100
    assert stdlib_sources == sorted(stdlib_sources)
    assert "os.py" in stdlib_sources
    assert not any(set(p.split("/")[:-1]) & SKIP_DIRS for p in stdlib_sources)


def test_empty_root_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no .py files"):
        list_sources(tmp_path)


@pytest.mark.parametrize("eval_fraction", [0.05, 0.3])
def test_split_is_disjoint_complete_and_stable(stdlib_sources, eval_fraction):
    train, evals = split_files(stdlib_sources, eval_fraction)
    assert not set(train) & set(evals)
    assert sorted(train + evals) == stdlib_sources
    assert (train, evals) == split_files(list(stdlib_sources), eval_fraction)
    # the fraction is honoured loosely (it is a hash, not a quota)
    assert 0.3 * eval_fraction < len(evals) / len(stdlib_sources) < 2.5 * eval_fraction


@pytest.mark.parametrize("path", ["os.py", "asyncio/tasks.py", "json/__init__.py"])
def test_split_rule_is_sha1_of_relative_path(path):
    frac = int(hashlib.sha1(path.encode()).hexdigest()[:16], 16) / 2**64
    assert is_eval_file(path, frac + 1e-9) and not is_eval_file(path, frac)


def test_split_same_in_another_process_with_other_hash_seed(stdlib_sources):
    """``hash()`` is salted per process; the split must not be."""
    code = (
        "from plumage_ds.train.data import default_root, list_sources, split_files; "
        "print('|'.join(split_files(list_sources(default_root()), 0.05)[1]))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().split("|") == split_files(stdlib_sources, 0.05)[1]


# --------------------------------------------------------------------------- corpus bytes


def test_corpus_budget_and_provenance(fake_root):
    cfg = DataConfig(seq_len=4, batch_size=2, eval_fraction=0.5, max_corpus_bytes=150, path=str(fake_root))
    corpus = load_corpus(cfg)
    assert corpus.train_tokens.dtype == torch.uint8
    assert corpus.eval_tokens.numel() == 75
    assert corpus.train_tokens.numel() == 75
    train, evals = split_files(list_sources(fake_root), 0.5)
    want_train = b"".join((fake_root / p).read_bytes() for p in train)[:75]
    assert bytes(corpus.train_tokens.tolist()) == want_train
    assert set(corpus.train_files) <= set(train) and set(corpus.eval_files) <= set(evals)
    desc = corpus.describe()
    assert desc["train_bytes"] == 75 and desc["eval_bytes"] == 75 and len(desc["sha1"]) == 40
    assert load_corpus(cfg).describe() == desc


def test_corpus_too_small_for_a_window_names_the_budget(fake_root):
    cfg = DataConfig(seq_len=64, batch_size=2, eval_fraction=0.5, max_corpus_bytes=100, path=str(fake_root))
    with pytest.raises(ValueError, match=r"max_corpus_bytes=100.*seq_len\+1=65: its share of the budget is 50 bytes"):
        load_corpus(cfg)


def _few_files(root, n: int, size: int = 30_000) -> list[str]:
    """``n`` ASCII text files of ``size`` bytes, none of whose names hashes into eval at 0.3."""
    names = [f"part{i}.txt" for i in range(40) if not is_eval_file(f"part{i}.txt", 0.3)][:n]
    for i, name in enumerate(names):
        words = [f"w{(i * 13 + k) % 97}" for k in range(size)]
        (root / name).write_bytes(" ".join(words).encode()[:size])
    return names


@pytest.mark.parametrize("n, eval_fraction", [(3, 0.05), (8, 0.05), (3, 0.3)])
def test_few_files_carve_eval_from_their_tails(tmp_path, n, eval_fraction):
    """No file hashed into eval: every file's last ``eval_fraction`` is eval instead, the rest train."""
    names = _few_files(tmp_path, n)
    cfg = DataConfig(source="text", path=str(tmp_path), seq_len=32, max_corpus_bytes=200_000, eval_fraction=eval_fraction)
    corpus = load_corpus(cfg)
    assert corpus.split == "tails" and corpus.describe()["split"] == "tails"
    assert corpus.note.startswith(f"data: no document of {n} hashed into the eval split (eval_fraction={eval_fraction}")
    assert "eval is the last" in corpus.note and len(corpus.note.splitlines()) == 1
    docs = [(tmp_path / name).read_bytes() for name in sorted(names)]
    want_eval = b"".join(d[len(d) - int(np.ceil(eval_fraction * len(d))):] for d in docs)
    budget = round(cfg.max_corpus_bytes * eval_fraction)
    assert bytes(corpus.eval_tokens.tolist()) == want_eval[:budget]
    heads = b"".join(d[: len(d) - int(np.ceil(eval_fraction * len(d)))] for d in docs)
    assert bytes(corpus.train_tokens.tolist()) == heads[: cfg.max_corpus_bytes - budget]
    assert load_corpus(cfg).describe() == corpus.describe()  # deterministic


def test_tail_cut_keeps_utf8_characters_whole(tmp_path):
    from plumage_ds.train.data import _tail_start

    data = "aé".encode() * 10  # 30 bytes, 'é' is 2 of each 3
    assert _tail_start(data, 0.1) == 27  # the last 3 bytes start at an 'a'
    cut = _tail_start(data, 0.03)  # the last byte is the second half of an 'é': the tail takes it whole
    assert cut == 28 and data[cut:].decode() == "é"
    assert _tail_start(data[:2], 0.5) == 1 and _tail_start(b"", 0.5) == 0


def test_too_small_corpus_names_the_real_cause(tmp_path):
    names = _few_files(tmp_path, 3, size=200)  # tails of 10 bytes each: 30 < 33
    cfg = DataConfig(source="text", path=str(tmp_path), seq_len=32, max_corpus_bytes=200_000)
    with pytest.raises(ValueError, match=r"^Invalid data.eval_fraction=0.05: the eval split has \d+ bytes .* no document of 3 "
                                         r"hashed into it, and their last 5% hold only \d+ bytes; raise data.eval_fraction"):
        load_corpus(cfg)
    for name in names[1:]:
        (tmp_path / name).unlink()
    (tmp_path / names[0]).write_bytes(b"x" * 20)
    with pytest.raises(ValueError, match=rf"^Invalid data.path='{tmp_path}': the train split has 19 bytes / 19 tokens, "
                                         r"fewer than seq_len\+1=33: that is all the corpus holds"):
        load_corpus(cfg)


def test_stdlib_corpus_splits_budget_proportionally():
    corpus = load_corpus(SMALL)
    assert corpus.eval_tokens.numel() == round(SMALL.max_corpus_bytes * SMALL.eval_fraction)
    assert corpus.train_tokens.numel() + corpus.eval_tokens.numel() == SMALL.max_corpus_bytes
    assert not set(corpus.train_files) & set(corpus.eval_files)


# --------------------------------------------------------------------------- batches


def test_batches_reproducible_for_same_seed(stream):
    other = BatchStream(load_corpus(SMALL), SMALL, seed=0)
    for step in (0, 1, 7):
        assert torch.equal(stream.global_batch(step, 8), other.global_batch(step, 8))
    # a step's batch does not depend on what was drawn before
    assert torch.equal(BatchStream(stream.corpus, SMALL, seed=0).global_batch(7, 8), stream.global_batch(7, 8))


def test_batches_differ_across_steps_and_seeds(stream):
    b0 = stream.global_batch(0, 8)
    assert not torch.equal(b0, stream.global_batch(1, 8))
    assert not torch.equal(b0, BatchStream(stream.corpus, SMALL, seed=1).global_batch(0, 8))


def test_windows_are_contiguous_corpus_slices(stream):
    batch = stream.global_batch(3, 8)
    assert batch.shape == (8, SMALL.seq_len + 1) and batch.dtype == torch.int64
    all_windows = stream.corpus.train_tokens.long().unfold(0, SMALL.seq_len + 1, 1)
    for row in batch:
        assert (all_windows == row).all(dim=1).any()


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_rank_slices_tile_the_global_batch(stream, world_size, grad_accum):
    """World-size invariance of the data: the ranks' micro-batches tile one global batch."""
    whole = stream.global_batch(5, SMALL.batch_size * grad_accum * world_size)
    parts = []
    for rank in range(world_size):
        micro = stream.micro_batches(5, grad_accum, rank=rank, world_size=world_size)
        assert len(micro) == grad_accum and all(m.shape[0] == SMALL.batch_size for m in micro)
        parts.extend(micro)
    assert torch.equal(torch.cat(parts), whole)


def test_rank_slice_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank=2"):
        rank_slice(torch.zeros(4, 3), 2, 2)


def test_eval_set_fixed_and_spans_split(stream):
    ev = stream.eval_set(3)
    assert len(ev) == 3 and all(b.shape == (SMALL.batch_size, SMALL.seq_len + 1) for b in ev)
    assert all(torch.equal(a, b) for a, b in zip(ev, BatchStream(stream.corpus, SMALL, seed=99).eval_set(3)))
    tokens = stream.corpus.eval_tokens.long()
    assert torch.equal(ev[0][0], tokens[: SMALL.seq_len + 1])
    assert torch.equal(ev[-1][-1], tokens[-(SMALL.seq_len + 1) :])
