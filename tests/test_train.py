"""``peftfast train``: the command-line fine-tuning job and its data loading (tiny runs on CPU)."""
import json

import pytest

import peftfast
from peftfast.cli import main as cli_main
from peftfast.data import DataError, byte_tokenizer, load_dataset, prompt_completion_example, split
from peftfast.train import TrainError
from peftfast.train import main as train_main

FAST = ["--seq-len", "32", "--batch-size", "4", "--logging-steps", "100"]


def test_default_run_saves_loadable_adapter(tmp_path, capsys):
    out = tmp_path / "adapter"
    res = train_main(["--max-steps", "5", "--output", str(out), *FAST])
    assert len(res["losses"]) == 5 and res["eval_loss"] > 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "eval loss" in printed and "tok/s" in printed
    from transformers import LlamaForCausalLM

    from peftfast.demo import load_4bit_base, tiny_llama_config

    base_dir = tmp_path / "base"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(base_dir)
    peftfast.load_adapter(load_4bit_base(str(base_dir)), str(out))


def test_loss_decreases(tmp_path):
    res = train_main(["--max-steps", "30", "--lr", "3e-3", "--output", str(tmp_path / "o"), *FAST])
    losses = res["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses


def test_prompt_completion_masks_prompt(tmp_path):
    tok = byte_tokenizer()
    ex = prompt_completion_example(tok, "Q: hi\nA:", " yes", 64)
    n_prompt = 1 + len("Q: hi\nA:")
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] == list(b" yes") + [256]
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "ab", "completion": "c"}) + "\n\n" + json.dumps({"text": "xyz"}) + "\n")
    exs = load_dataset(f, tok, 64)
    assert exs[0]["labels"] == [-100, -100, -100, ord("c"), 256]
    assert exs[1]["labels"] == exs[1]["input_ids"] == [256, ord("x"), ord("y"), ord("z"), 256]
    train, held = split(exs, 0.05, 0)
    assert len(held) == 1 and len(train) == 1


def test_malformed_jsonl_names_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3"):
        load_dataset(f, byte_tokenizer(), 32)
    f.write_text('{"text": "ok"}\n{"foo": 1}\n')
    with pytest.raises(DataError, match=r":2:"):
        load_dataset(f, byte_tokenizer(), 32)


def test_empty_data_errors(tmp_path, capsys):
    for name, content in (("empty.txt", ""), ("empty.jsonl", "\n\n")):
        f = tmp_path / name
        f.write_text(content)
        with pytest.raises(DataError, match="empty"):
            load_dataset(f, byte_tokenizer(), 32)
    rc = cli_main(["train", "--data", str(tmp_path / "empty.txt"), "--output", str(tmp_path / "o")])
    assert rc == 2 and "empty" in capsys.readouterr().err


def test_nonempty_output_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(TrainError, match="--overwrite"):
        train_main(["--max-steps", "1", "--output", str(out), *FAST])
    rc = cli_main(["train", "--max-steps", "1", "--output", str(out), *FAST])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"
    res = train_main(["--max-steps", "1", "--output", str(out), "--overwrite", *FAST])
    assert (out / "adapter_model.safetensors").is_file() and res["steps"] == 1
