"""Checkpoints of the main job: layout, collective save, resume — all through :mod:`plumage_ds.io`.

``OUT/checkpoints/step_<8 digits>/``::

    model/           save_pretrained: config.json + model.safetensors (+ tokenizer.json):
                     AutoModelForCausalLM.from_pretrained(".../model") loads it
    engine/          the engine's state (optimizer; PLUMAGE shards per rank; comm-hook state;
                     DeepSpeed's own checkpoint)
    rng/rank<k>.pt   each rank's torch RNG state (dropout draws resume exactly)
    trainer.json     step, world size, engine, the loss window of the step recorder
    MANIFEST.json    written last, after a barrier: lists every file with its size

A checkpoint counts only once its manifest is written (:func:`plumage_ds.io.newest_complete`);
``--resume`` loads the newest complete one, and ``train.keep_last`` complete ones are kept.
Resuming on the same world size continues bitwise: weights and optimizer state are saved
exactly, the batches of step ``s`` are a pure function of ``(seed, s)`` and the LR schedule of
the step index.
"""

from __future__ import annotations

import json
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
    checkpoint_dir,
    newest_complete,
    prune,
    write_manifest,
)

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


def save_checkpoint(
    engine, root: Path, step: int, trainer: dict, *, keep_last: int, tokenizer_file: Optional[Path] = None
) -> Path:
    """Save the checkpoint of ``step`` under ``root`` (collective); seal it, then prune old ones."""
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
    engine.barrier()
    if engine.rank == 0:
        state = {"format": FORMAT, "step": step, "world_size": engine.world_size, "engine": engine.name, **trainer}
        atomic_write_json(path / "trainer.json", state)
        write_manifest(path, step, {"world_size": engine.world_size, "engine": engine.name})
        prune(root, keep_last)
    engine.barrier()
    return path


def find_resume_point(out: Path) -> tuple[int, Path]:
    """``(step, path)`` of the newest complete checkpoint in ``OUT/checkpoints``; a clear error if none."""
    found = newest_complete(out / CHECKPOINTS)
    if found is None:
        raise ValueError(
            f"Invalid --resume: no complete checkpoint in {out / CHECKPOINTS} "
            "(a run saves them every train.save_interval steps; 0 saves none)"
        )
    return found


def load_checkpoint(engine, path: Path) -> dict:
    """Restore model weights, engine state, this rank's RNG and the LR schedule; return ``trainer.json``."""
    trainer = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    if trainer.get("format") != FORMAT:
        raise ValueError(f"Invalid checkpoint {path}: trainer.json format {trainer.get('format')!r}")
    if trainer["engine"] != engine.name:
        raise ValueError(
            f"Invalid --resume: {path} was saved by train.engine={trainer['engine']!r}, this run uses {engine.name!r}"
        )
    engine.load_model_weights(path / MODEL_DIR / "model.safetensors")
    engine.load(path / "engine")
    rng = path / "rng" / f"rank{engine.rank}.pt"
    saved = torch.load(rng if rng.is_file() else path / "rng" / "rank0.pt", weights_only=True)
    torch.set_rng_state(saved["cpu"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])
    engine.after_load(int(trainer["step"]))
    return trainer
