"""Data sources (text folder/glob, jsonl, hf_dataset), a local tokenizer and a non-LLaMA model,
each trained end to end through ``plumage-ds train``; the record split is stable across processes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from plumage_ds.cli import main
from plumage_ds.config import DataConfig, from_dict
from plumage_ds.train.data import is_eval_file, list_text_files, load_corpus

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()


def _doc(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(40)) + f" {i}."


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "text" / "sub").mkdir(parents=True)
    for i in range(30):
        (root / "text" / ("sub" if i % 2 else "") / f"doc{i:02d}.{'md' if i % 3 == 0 else 'txt'}").write_text(_doc(i))
    (root / "text" / "skip.bin").write_bytes(b"\x00" * 100)
    with open(root / "docs.jsonl", "w") as fh:
        for i in range(60):
            fh.write(json.dumps({"text": _doc(i), "id": i}) + "\n")
    datasets = pytest.importorskip("datasets", reason="the 'data' extra (datasets) is part of make install")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": [_doc(i) for i in range(60)]})}).save_to_disk(
        str(root / "hf")
    )
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([_doc(i) for i in range(60)], trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"]))
    (root / "tok").mkdir()
    tok.save(str(root / "tok" / "tokenizer.json"))
    return root


def _data(corpus_dir, **kw) -> DataConfig:
    base = dict(seq_len=16, batch_size=2, eval_fraction=0.2, max_corpus_bytes=20_000)
    return from_dict(DataConfig, {**base, **kw})


def test_text_folder_and_glob(corpus_dir):
    base, files = list_text_files(str(corpus_dir / "text"), (".txt", ".md"))
    assert len(files) == 30 and files == sorted(files) and "sub/doc01.txt" in files
    _, md = list_text_files(str(corpus_dir / "text" / "**" / "*.md"), ())
    assert len(md) == 10 and all(f.endswith(".md") for f in md)
    corpus = load_corpus(_data(corpus_dir, source="text", path=str(corpus_dir / "text")))
    evals = {f for f in files if is_eval_file(f, 0.2)}
    assert set(corpus.eval_files) == evals and not set(corpus.train_files) & evals
    with pytest.raises(ValueError, match=r"^Invalid data.path='.*nothing\*': the glob matches no file$"):
        load_corpus(_data(corpus_dir, source="text", path=str(corpus_dir / "nothing*")))


def test_jsonl_and_hf_dataset_give_the_same_corpus(corpus_dir):
    a = load_corpus(_data(corpus_dir, source="jsonl", path=str(corpus_dir / "docs.jsonl")))
    b = load_corpus(_data(corpus_dir, source="hf_dataset", path=str(corpus_dir / "hf"), field="body"))
    assert a.describe()["sha1"] == b.describe()["sha1"]  # same records, same split rule
    assert 0 < a.eval_tokens.numel() < a.train_tokens.numel()
    with pytest.raises(ValueError, match=r"^Invalid data.field='body': missing in docs.jsonl line 1"):
        load_corpus(_data(corpus_dir, source="jsonl", path=str(corpus_dir / "docs.jsonl"), field="body"))
    with pytest.raises(ValueError, match=r"^Invalid data.split='test': not in the saved DatasetDict \(splits: \['train'\]\)$"):
        load_corpus(_data(corpus_dir, source="hf_dataset", path=str(corpus_dir / "hf"), field="body", split="test"))


def test_jsonl_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(ValueError, match=rf"^Invalid data.path='{path}': line 2 is not UTF-8 \(byte 0xe9 at column 14\)$"):
        load_corpus(_data(tmp_path, source="jsonl", path=str(path)))


def test_dataset_dict_validation_split_is_the_eval_split(corpus_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"train": [_doc(i) for i in range(40)], "validation": [_doc(i) for i in range(100, 110)], "test": ["x"]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in rows.items()}).save_to_disk(str(tmp_path / "hf"))
    corpus = load_corpus(_data(tmp_path, source="hf_dataset", path=str(tmp_path / "hf")))
    assert corpus.split == "dataset:validation" and corpus.describe()["split"] == "dataset:validation"
    assert bytes(corpus.eval_tokens.tolist()) == "".join(t + "\n" for t in rows["validation"]).encode()
    assert bytes(corpus.train_tokens.tolist()) == "".join(t + "\n" for t in rows["train"]).encode()
    assert (len(corpus.eval_files), len(corpus.train_files)) == (10, 40)
    with pytest.raises(ValueError, match=r"^Invalid data.eval_split='dev': not in the saved DatasetDict \(splits: \['test', 'train', 'validation'\]\)$"):
        load_corpus(_data(tmp_path, source="hf_dataset", path=str(tmp_path / "hf"), eval_split="dev"))
    with pytest.raises(ValueError, match=r"^Invalid data.eval_split='test': the eval split has 2 bytes"):
        load_corpus(_data(tmp_path, source="hf_dataset", path=str(tmp_path / "hf"), eval_split="test"))
    with pytest.raises(ValueError, match=r"^Invalid eval_split='validation': only for source 'hf_dataset', not 'jsonl'$"):
        _data(tmp_path, source="jsonl", path="x", eval_split="validation")


def test_a_few_text_files_train_with_the_defaults(tmp_path, tiny_config_path, capsys):
    """Three files, none hashed into eval: the run trains, and says in one line where eval came from."""
    from plumage_ds.train.data import is_eval_file

    (tmp_path / "txt").mkdir()
    for i in range(3):
        assert not is_eval_file(f"f{i}.txt", 0.05)
        (tmp_path / "txt" / f"f{i}.txt").write_text(_doc(i) * 100)
    out = tmp_path / "run"
    argv = ["train", "--config", str(tiny_config_path), "--out", str(out), "--steps", "2", "--no-progress",
            "--set", "data.source=text", "--set", f"data.path={tmp_path / 'txt'}"]  # fmt: skip
    assert main(argv) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "eval split" in x]
    assert len(lines) == 1 and "eval is the last 5% of every document instead" in lines[0], lines
    assert json.loads((out / "summary.json").read_text())["corpus"]["split"] == "tails"


def test_record_split_stable_across_processes(corpus_dir):
    """Same sha1 of the token split in a fresh interpreter with another hash seed."""
    code = (
        "from plumage_ds.config import DataConfig; from plumage_ds.train.data import load_corpus; "
        f"print(load_corpus(DataConfig(source='jsonl', path={str(corpus_dir / 'docs.jsonl')!r}, seq_len=16, "
        "eval_fraction=0.2, max_corpus_bytes=20000)).describe()['sha1'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONHASHSEED": "123"},
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    here = load_corpus(_data(corpus_dir, source="jsonl", path=str(corpus_dir / "docs.jsonl"))).describe()["sha1"]
    assert out.stdout.strip() == here


def test_tokenizer_directory(corpus_dir):
    corpus = load_corpus(_data(corpus_dir, source="jsonl", path=str(corpus_dir / "docs.jsonl"), tokenizer=str(corpus_dir / "tok")))
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(corpus_dir / "tok" / "tokenizer.json")).get_vocab_size()
    assert corpus.vocab_size == vocab and corpus.train_tokens.dtype.is_signed
    assert int(corpus.train_tokens.max()) < vocab
    byte = load_corpus(_data(corpus_dir, source="jsonl", path=str(corpus_dir / "docs.jsonl")))
    assert corpus.train_tokens.numel() < byte.train_tokens.numel() / 2  # BPE merges bytes


GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 32}


@pytest.mark.parametrize(
    "data, model",
    [
        ({"source": "text", "path": "{root}/text"}, None),
        ({"source": "jsonl", "path": "{root}/docs.jsonl", "tokenizer": "{root}/tok"}, None),
        ({"source": "hf_dataset", "path": "{root}/hf", "field": "body"}, GPT2),
    ],
    ids=["text", "jsonl+tokenizer", "hf_dataset+gpt2"],
)
def test_train_end_to_end(tmp_path, corpus_dir, tiny_config_path, data, model):
    cfg = yaml.safe_load(tiny_config_path.read_text())
    cfg["data"].update({k: v.format(root=corpus_dir) for k, v in data.items()})
    cfg["data"].update(seq_len=16, max_corpus_bytes=20_000, eval_fraction=0.2)
    cfg["optimizer"]["estimator"] = "plumage"
    if model is not None:
        cfg["model"] = dict(model)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(out), "--steps", "3", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["corpus"]["source"] == data["source"]
    assert summary["model"]["model_type"] == (model or {}).get("model_type", "llama")
    assert any(r["mode"] == "plumage" for r in summary["matrices"])
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert loaded.config.vocab_size == summary["corpus"]["vocab_size"]
    if "tokenizer" in data:
        assert (out / "model" / "tokenizer.json").is_file()
