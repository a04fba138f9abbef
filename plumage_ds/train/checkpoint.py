"""Checkpoints of the main job: layout, collective save, resume — all through :mod:`plumage_ds.io`.

``OUT/checkpoints/step_<8 digits>/``::

    model/           save_pretrained: config.json + model.safetensors (+ tokenizer.json):
                     AutoModelForCausalLM.from_pretrained(".../model") loads it
    engine/          the engine's state (optimizer; PLUMAGE shards per rank; comm-hook state;
                     DeepSpeed's own checkpoint)
    rng/rank<k>.pt   each rank's torch RNG state (dropout draws resume exactly)
    trainer.json     step, world size, global batch, engine, corpus digest, the loss window
    MANIFEST.json    written last, after a barrier: lists every file with its size and SHA-256

A checkpoint counts only once its manifest is written (:func:`plumage_ds.io.newest_complete`);
``train.keep_last`` complete ones are kept. ``--resume`` loads the newest one whose files all
match their manifest's sizes and SHA-256 (:func:`find_resume_point`): a damaged or unfinished
newer one is never loaded, and is named in one logged line with the one used instead. The
digests are taken by the ranks together (each file hashed once, by the rank that wrote it
through :mod:`plumage_ds.io` where possible). Resuming on the same world size continues bitwise:
weights and optimizer state are saved exactly, the batches of step ``s`` are a pure function of
``(seed, s)`` and the LR schedule of the step index.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Optional

import torch

from plumage_ds.io import (
    atomic_dir,
    atomic_torch_save,
    atomic_write_json,
    begin_checkpoint,
    cached_sha256,
    checkpoint_dir,
    checkpoint_files,
    file_sha256,
    newest_verified,
    prune,
    write_manifest,
)

logger = logging.getLogger("plumage_ds.train")

CHECKPOINTS = "checkpoints"
KILL_DURING_SAVE_ENV = "PLUMAGE_DS_KILL_DURING_SAVE"
"""Fault injection for tests: SIGKILL in the middle of saving the checkpoint of this step (after
its files, before its manifest), as a ``kill -9`` at that instant would."""
MODEL_DIR = "model"
FORMAT = 1


def save_pretrained(engine, target: Path, tokenizer_file: Optional[Path] = None) -> None:
    """Write the model with ``save_pretrained`` (safetensors) into ``target``, atomically.

    Collective: every rank enters (ZeRO-3 gathers the weights), rank 0 writes.
    """
    from transformers.utils import logging as hf_logging

    with engine.full_model() as model:
        if engine.rank == 0:
            hf_logging.disable_progress_bar()
            with atomic_dir(target) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                if tokenizer_file is not None:
                    shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
    engine.barrier()


def _rng_state() -> dict:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _digests(engine, path: Path) -> dict[str, str]:
    """SHA-256 of every file of the checkpoint at ``path`` (collective), each file read at most once:
    every rank contributes the digests it took while writing, then the rest is split across ranks."""
    files = checkpoint_files(path)
    known: dict[str, str] = {}
    for part in engine.gather_object({f: d for f in files if (d := cached_sha256(path / f)) is not None}):
        known.update(part)
    rest = [f for f in files if f not in known]
    for part in engine.gather_object({f: file_sha256(path / f) for f in rest[engine.rank :: engine.world_size]}):
        known.update(part)
    return known


def save_checkpoint(
    engine, root: Path, step: int, trainer: dict, *, keep_last: int, tokenizer_file: Optional[Path] = None
) -> Path:
    """Save the checkpoint of ``step`` under ``root`` (collective); seal it, then prune old ones.

    ``trainer`` goes into ``trainer.json`` next to the step, world size and engine."""
    if engine.rank == 0:
        begin_checkpoint(root, step)
        (checkpoint_dir(root, step) / "engine").mkdir()
    engine.barrier()
    path = checkpoint_dir(root, step)
    save_pretrained(engine, path / MODEL_DIR, tokenizer_file)
    engine.save(path / "engine")
    atomic_torch_save(_rng_state(), path / "rng" / f"rank{engine.rank}.pt")
    if int(os.environ.get(KILL_DURING_SAVE_ENV, "0") or 0) == step:
        os.kill(os.getpid(), signal.SIGKILL)  # test fault injection: every file but the manifest is written
    if engine.rank == 0:
        state = {"format": FORMAT, "step": step, "world_size": engine.world_size, "engine": engine.name, **trainer}
        atomic_write_json(path / "trainer.json", state)
    engine.barrier()
    digests = _digests(engine, path)
    if engine.rank == 0:
        write_manifest(path, step, {"world_size": engine.world_size, "engine": engine.name}, digests)
        prune(root, keep_last)
    engine.barrier()
    return path


def find_resume_point(out: Path) -> tuple[int, Path]:
    """``(step, path)`` of the newest checkpoint in ``OUT/checkpoints`` whose files all match their
    manifest (sizes and SHA-256); each newer one is skipped with one logged line naming it, why,
    and the one used instead. One-line ``ValueError`` if none is usable."""
    root = out / CHECKPOINTS
    found, skipped = newest_verified(root)
    if found is None and not skipped:
        raise ValueError(
            f"Invalid --resume: no complete checkpoint in {root} (a run saves them every train.save_interval steps; 0 saves none)"
        )
    if found is None:
        why = "; ".join(f"{p.name}: {problem}" for p, problem in skipped)
        raise ValueError(f"Invalid --resume: no usable checkpoint in {root}: {why}")
    for p, problem in skipped:
        logger.warning("checkpoint %s is unusable: %s; resuming from %s instead", p, problem, found[1].name)
    return found


def read_trainer(path: Path) -> dict:
    """``trainer.json`` of the checkpoint at ``path`` (one-line ``ValueError`` if unreadable or of another format)."""
    try:
        trainer = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"Invalid checkpoint {path}: trainer.json is unreadable ({type(err).__name__})") from None
    if not isinstance(trainer, dict) or trainer.get("format") != FORMAT:
        raise ValueError(f"Invalid checkpoint {path}: trainer.json format {trainer.get('format') if isinstance(trainer, dict) else None!r}")
    return trainer


def load_checkpoint(engine, path: Path) -> dict:
    """Restore model weights, engine state, this rank's RNG and the LR schedule; return ``trainer.json``.

    A file that cannot be loaded (damaged under a manifest without digests, or not this model's) is
    a one-line ``ValueError`` naming the checkpoint, never a traceback."""
    trainer = read_trainer(path)
    if trainer["engine"] != engine.name:
        raise ValueError(
            f"Invalid --resume: {path} was saved by train.engine={trainer['engine']!r}, this run uses {engine.name!r}"
        )
    try:
        engine.load_model_weights(path / MODEL_DIR / "model.safetensors")
        engine.load(path / "engine")
        rng = path / "rng" / f"rank{engine.rank}.pt"
        saved = torch.load(rng if rng.is_file() else path / "rng" / "rank0.pt", weights_only=True)
    except ValueError:
        raise
    except Exception as err:  # torch.load / safetensors / DCP on a file they cannot read
        text = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"Invalid checkpoint {path}: cannot load it ({type(err).__name__}: {text})") from err
    torch.set_rng_state(saved["cpu"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])
    engine.after_load(int(trainer["step"]))
    return trainer
