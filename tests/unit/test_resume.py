"""``--resume`` on the local engine: a damaged checkpoint is never loaded (content digests in the
manifest), paths do not depend on the working directory, and the global batch is kept (or set)."""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from plumage_ds.cli import load_job_config, main
from plumage_ds.config import ConfigError

SETS = ["train.save_interval=1", "train.keep_last=3", "optimizer.estimator=plumage", "optimizer.update_interval=2",
        "train.log_interval=1"]  # fmt: skip


def run_main(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_config_path) -> Path:
    """A 3-step local run with checkpoints at steps 1, 2 and 3."""
    out = tmp_path_factory.mktemp("resume") / "run"
    sets = [x for s in SETS for x in ("--set", s)]
    assert run_main("train", "--config", tiny_config_path, "--out", out, "--steps", "3", "--no-progress", *sets) == 0
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _zip_member_offset(path: Path, pick) -> int:
    """File offset of the data of the first member of a ``torch.save`` zip that ``pick(info)`` accepts."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if pick(i))
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _tensor_bytes(ckpt: Path) -> None:  # a moment's bytes: torch.load would accept them silently
    f = ckpt / "engine" / "optimizer.pt"
    _flip(f, _zip_member_offset(f, lambda i: "/data/" in i.filename and i.file_size >= 64) + 17)


def _pickle_bytes(ckpt: Path) -> None:
    f = ckpt / "engine" / "optimizer.pt"
    _flip(f, _zip_member_offset(f, lambda i: i.filename.endswith("data.pkl")) + 5)


def _safetensors_header(ckpt: Path) -> None:
    _flip(ckpt / "model" / "model.safetensors", 12)


def _truncated(ckpt: Path) -> None:
    f = ckpt / "engine" / "optimizer.pt"
    f.write_bytes(f.read_bytes()[:1000])


DAMAGE = {"tensor-bytes": _tensor_bytes, "pickle-bytes": _pickle_bytes, "safetensors-header": _safetensors_header,
          "truncated": _truncated}  # fmt: skip


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_checkpoint_is_skipped_with_one_line(finished, tmp_path, damage, capsys):
    from safetensors.torch import load_file

    out = _copy(finished, tmp_path)
    before = load_file(str(out / "model" / "model.safetensors"))
    DAMAGE[damage](out / "checkpoints" / "step_00000003")
    capsys.readouterr()
    assert run_main("train", "--out", out, "--resume", "--no-progress") == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "unusable" in x]
    assert len(lines) == 1 and "step_00000003 is unusable: " in lines[0], lines
    assert lines[0].endswith("; resuming from step_00000002 instead")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_step"] == 2
    after = load_file(str(out / "model" / "model.safetensors"))  # step 3 redone from step 2: bitwise the same
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_no_usable_checkpoint_exits_2_and_records_the_error(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    for step in (1, 2, 3):
        _tensor_bytes(out / "checkpoints" / f"step_{step:08d}")
    (out / "summary.json").unlink()  # as a killed run leaves it
    capsys.readouterr()
    assert run_main("train", "--out", out, "--resume", "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "Invalid --resume: no usable checkpoint in " in err
    assert "step_00000003: engine/optimizer.pt does not match its SHA-256 in MANIFEST.json (damaged); step_00000002:" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("Invalid --resume: no usable checkpoint")
    # a completed run's summary is left as it was
    done = {"status": "completed", "steps_completed": 3}
    (out / "summary.json").write_text(json.dumps(done))
    assert run_main("train", "--out", out, "--resume", "--no-progress") == 2
    assert json.loads((out / "summary.json").read_text()) == done


def test_manifest_without_digests_loads_and_load_errors_are_one_line(finished, tmp_path, capsys):
    """Format-1 manifests (sizes only) still resume; a file that then fails to load is exit 2, one line."""
    out = _copy(finished, tmp_path)
    for step in (2, 3):
        m = out / "checkpoints" / f"step_{step:08d}" / "MANIFEST.json"
        manifest = json.loads(m.read_text())
        manifest.update(format=1, files={k: v["size"] for k, v in manifest["files"].items()})
        m.write_text(json.dumps(manifest))
    assert run_main("train", "--out", out, "--resume", "--no-progress") == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 3
    _pickle_bytes(out / "checkpoints" / "step_00000003")
    capsys.readouterr()
    assert run_main("train", "--out", out, "--resume", "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"Invalid checkpoint {out / 'checkpoints' / 'step_00000003'}: cannot load it (" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("Invalid checkpoint")


def test_resume_from_another_directory(tmp_path, tiny_config_path, monkeypatch):
    """Relative paths are recorded absolute, so ``--resume`` works from anywhere."""
    from plumage_ds.train.data import is_eval_file

    (tmp_path / "a" / "corpus").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for i in range(6):
        (tmp_path / "a" / "corpus" / f"doc{i}.txt").write_text(" ".join(f"word{(i * 7 + k) % 50}" for k in range(800)))
    assert any(is_eval_file(f"doc{i}.txt", 0.5) for i in range(6))  # the hash split alone has an eval split
    monkeypatch.chdir(tmp_path / "a")
    argv = ["train", "--config", tiny_config_path, "--out", "run", "--steps", "2", "--no-progress", "--set", "data.source=text",
            "--set", "data.path=corpus", "--set", "data.eval_fraction=0.5", "--set", "train.save_interval=1"]  # fmt: skip
    assert run_main(*argv) == 0
    saved = yaml.safe_load((tmp_path / "a" / "run" / "config.yaml").read_text())
    assert saved["data"]["path"] == str(tmp_path / "a" / "corpus")
    monkeypatch.chdir(tmp_path / "b")
    assert run_main("train", "--out", tmp_path / "a" / "run", "--resume", "--no-progress") == 0
    assert json.loads((tmp_path / "a" / "run" / "summary.json").read_text())["resumed_from_step"] == 2


def test_batch_may_be_set_on_resume(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step_00000003")
    capsys.readouterr()
    # the same global batch split another way: accepted silently
    assert run_main("train", "--out", out, "--resume", "--no-progress", "--set", "data.batch_size=2",
                    "--set", "train.grad_accum=2") == 0  # fmt: skip
    assert "global batch" not in capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["data"]["batch_size"] == 2 and summary["config"]["train"]["grad_accum"] == 2
    assert summary["tokens_per_step"] == 4 * 32
    # another global batch: accepted as set, said in one line
    shutil.rmtree(out / "checkpoints" / "step_00000003")
    assert run_main("train", "--out", out, "--resume", "--no-progress", "--set", "data.batch_size=2") == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "global batch" in x]
    assert len(lines) == 1 and "the global batch changes from 4 to 2 windows per step" in lines[0], lines
    assert json.loads((out / "summary.json").read_text())["tokens_per_step"] == 2 * 32
    # the checkpoint of that step records the new global batch
    trainer = json.loads((out / "checkpoints" / "step_00000003" / "trainer.json").read_text())
    assert trainer["global_batch"] == 2 and trainer["world_size"] == 1


@pytest.mark.parametrize(
    "b, a, saved_world, world, want",
    [
        (4, 1, 2, 1, (4, 2)),  # 8 windows on 1 rank: accumulate twice
        (4, 2, 1, 2, (4, 1)),  # 8 windows on 2 ranks: accumulate once
        (4, 1, 1, 2, (2, 1)),  # 4 windows on 2 ranks: smaller micro-batches
        (6, 1, 2, 4, (3, 1)),  # 12 windows on 4 ranks: the largest batch_size <= 6 dividing 3
        (4, 1, 2, 2, (4, 1)),  # same world size: unchanged
    ],
)
def test_keep_global_batch(tiny_config_path, b, a, saved_world, world, want):
    from plumage_ds.train.loop import keep_global_batch

    cfg = load_job_config(str(tiny_config_path), [f"data.batch_size={b}", f"train.grad_accum={a}"])
    got, note = keep_global_batch(cfg, cfg, global_batch=b * a * saved_world, saved_world=saved_world, world=world)
    assert (got.data.batch_size, got.train.grad_accum) == want
    assert got.data.batch_size * got.train.grad_accum * world == b * a * saved_world
    assert (note is None) == (want == (b, a))
    if note:
        assert f"keep the global batch of {b * a * saved_world} windows per step" in note.replace("keeps", "keep")


def test_keep_global_batch_refuses_a_world_size_that_does_not_divide(tiny_config_path):
    from plumage_ds.train.loop import keep_global_batch

    cfg = load_job_config(str(tiny_config_path))
    with pytest.raises(ConfigError, match=r"^Invalid --resume='3 ranks': the checkpoint's global batch of 8 windows"):
        keep_global_batch(cfg, cfg, global_batch=8, saved_world=2, world=3)
