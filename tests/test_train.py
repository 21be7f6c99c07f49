"""``peftfast train``: the command-line fine-tuning job and its data loading (tiny runs on CPU)."""
import json

import pytest

import peftfast
from peftfast.cli import main as cli_main
from peftfast.cli.data import DataError, byte_tokenizer, load_dataset, prompt_completion_example, split
from peftfast.cli.train import TrainError
from peftfast.cli.train import main as train_main

FAST = ["--seq-len", "32", "--batch-size", "4", "--logging-steps", "100"]


def test_default_run_saves_adapter_that_reproduces_the_trained_model(tmp_path, capsys):
    """The saved adapter, loaded into the base the run trained on, computes what the trained model did:
    its held-out loss is the run's eval loss (and the base alone gives another)."""
    from peftfast.cli.basemodel import load_base
    from peftfast.cli.train import evaluate

    out = tmp_path / "adapter"
    argv = ["--max-steps", "5", "--output", str(out), *FAST]
    res = train_main(argv)
    assert len(res["losses"]) == 5 and res["eval_loss"] > 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "eval loss" in printed and "tok/s" in printed

    a = _resolved(argv)
    assert a.method == "qlora"  # the default: a 4-bit base, as the run loaded it
    base = load_base(None, load_in_4bit=True)
    assert base["fingerprint"] == json.loads((out / "train_log.json").read_text())["base_sha256"]
    model = peftfast.load_adapter(base["model"], str(out))
    tok = base["tokenizer"]
    _, held = split(load_dataset(a.data, tok, a.seq_len), a.eval_fraction, a.seed)
    reloaded = evaluate(model, held, a.batch_size, tok.pad_id, "cpu", bf16=False)
    # Same base, same adapter tensors (fp32 saved and loaded), same batches: equal up to summation noise.
    assert reloaded == pytest.approx(res["eval_loss"], rel=1e-6, abs=0)
    with peftfast.disable_adapters(model):
        base_loss = evaluate(model, held, a.batch_size, tok.pad_id, "cpu", bf16=False)
    assert abs(base_loss - res["eval_loss"]) > 1e-3, (base_loss, res["eval_loss"])


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


# ---------------------------------------------------------------------------------------------------
# Checkpoints, --resume and Ctrl-C
# ---------------------------------------------------------------------------------------------------

def _adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def _interrupt_at(monkeypatch, k):
    import peftfast.cli.train as train_mod

    def hook(step):
        if step == k:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_before_step", hook)


@pytest.mark.parametrize("method", ["qlora", "prompt"])
def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch, method):
    import torch

    import peftfast.cli.train as train_mod
    from peftfast.cli.train import TrainInterrupted

    flags = ["--max-steps", "6", "--method", method, "--lr", "3e-3", "--dropout", "0.1", "--num-virtual-tokens", "4",
             *FAST]
    straight = train_main([*flags, "--output", str(tmp_path / "a")])
    _interrupt_at(monkeypatch, 4)  # Ctrl-C before step 4: steps 1-3 are done
    with pytest.raises(TrainInterrupted) as info:
        train_main([*flags, "--output", str(tmp_path / "b")])
    assert info.value.step == 3 and info.value.checkpoint.name == "checkpoint-3"
    monkeypatch.setattr(train_mod, "_before_step", lambda step: None)
    resumed = train_main(["--output", str(tmp_path / "b"), "--resume"])  # settings come from the checkpoint
    assert resumed["losses"] == straight["losses"]
    assert resumed["eval_loss"] == straight["eval_loss"]
    a, b = _adapter_tensors(tmp_path / "a"), _adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # only the newest checkpoint is kept, and it is itself a loadable adapter directory
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-6"]
    assert (tmp_path / "b" / "checkpoint-6" / "adapter_config.json").is_file()
    assert not list((tmp_path / "b").glob(".checkpoint-*"))


def test_ctrl_c_exit_code_and_resume_message(tmp_path, monkeypatch, capsys):
    import peftfast.cli.train as train_mod

    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 3)
    rc = cli_main(["train", "--max-steps", "4", "--save-steps", "1", "--output", str(out), *FAST])
    printed = capsys.readouterr().out
    assert rc == 130
    assert "checkpoint of step 2/4" in printed and f"peftfast train --output {out} --resume" in printed
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    # no safetensors-free pickles anywhere: the state is JSON + safetensors
    names = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert {"training_state.json", "training_state.safetensors", "adapter_model.safetensors"} <= names
    monkeypatch.setattr(train_mod, "_before_step", lambda step: None)
    assert cli_main(["train", "--output", str(out), "--resume"]) == 0
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["losses"]) == 4 and log["resumed_from"].endswith("checkpoint-2")


def test_resume_errors(tmp_path):
    with pytest.raises(TrainError, match="nothing to resume"):
        train_main(["--output", str(tmp_path / "none"), "--resume", *FAST])
    out = tmp_path / "run"
    train_main(["--max-steps", "2", "--output", str(out), *FAST])
    with pytest.raises(TrainError, match=r"--r 4 \(the run used 8\)"):
        train_main(["--output", str(out), "--resume", "--r", "4", *FAST])


def test_missing_model_path(tmp_path, capsys):
    with pytest.raises(TrainError, match="not a local directory"):
        train_main(["--model", str(tmp_path / "no-such-model"), "--output", str(tmp_path / "o"), *FAST])
    assert cli_main(["train", "--model", str(tmp_path / "no-such-model"), "--output", str(tmp_path / "o")]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_model_dir_that_holds_no_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match="empty: cannot load it as a transformers causal LM"):
        train_main(["--model", str(tmp_path / "empty"), "--output", str(tmp_path / "o"), *FAST])
    assert not (tmp_path / "o").exists()


def test_seq_len_beyond_max_positions(tmp_path):
    # the embedded tiny Llama has 256 positions; prompt/prefix tuning's virtual tokens count too
    with pytest.raises(TrainError, match="exceeds the model's 256 positions.*--seq-len 256"):
        train_main(["--seq-len", "300", "--output", str(tmp_path / "o")])
    with pytest.raises(TrainError, match=r"250 \+ 16 virtual tokens exceeds.*--seq-len 240"):
        train_main(["--seq-len", "250", "--method", "prompt", "--output", str(tmp_path / "o")])


def test_bad_virtual_tokens_and_save_steps(tmp_path):
    with pytest.raises(TrainError, match="--num-virtual-tokens must be at least 1"):
        train_main(["--method", "prefix", "--num-virtual-tokens", "0", "--output", str(tmp_path / "o")])
    with pytest.raises(TrainError, match="--save-steps must be at least 1"):
        train_main(["--save-steps", "0", "--output", str(tmp_path / "o")])


def test_prompt_tuning_loss_is_on_real_tokens(tmp_path):
    """Prompt tuning returns logits for P extra positions; the loss the trainer uses must be the one over
    the real tokens only (the model pads labels with -100 for the virtual ones)."""
    import torch

    from peftfast.cli.basemodel import build_embedded_base

    model = peftfast.patch(build_embedded_base(), peftfast.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    from peftfast.cli.data import collate

    batch = collate([{"input_ids": list(range(40, 52)), "labels": list(range(40, 52))},
                     {"input_ids": list(range(60, 72)), "labels": list(range(60, 72))}], 256)
    assert (batch["labels"][:, 0] == -100).all()  # see collate: the first token is never a target
    ids = batch["input_ids"]
    out = model(**batch)
    assert out.logits.shape[1] == 12 + 5
    logits = out.logits[:, -12:]
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-5)
    res = train_main(["--method", "prefix", "--max-steps", "8", "--num-virtual-tokens", "4", "--output",
                      str(tmp_path / "p"), *FAST])
    assert sum(res["losses"][-3:]) / 3 < sum(res["losses"][:3]) / 3, res["losses"]


def test_overwrite_drops_old_checkpoints(tmp_path):
    out = tmp_path / "run"
    train_main(["--max-steps", "3", "--output", str(out), *FAST])
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    train_main(["--max-steps", "2", "--output", str(out), "--overwrite", *FAST])
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]


def _resolved(argv):
    import argparse

    from peftfast.cli.train import _resolve_defaults, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args(argv)
    _resolve_defaults(a)
    return a


def test_embedded_default_recipe_only_when_nothing_is_given(tmp_path):
    from peftfast.cli.train import DEFAULT_DATA, EMBEDDED_LR, EMBEDDED_STEPS

    a = _resolved([])
    assert (a.max_steps, a.epochs, a.lr) == (EMBEDDED_STEPS, 1.0, 3e-3)
    assert _resolved(["--method", "ia3"]).lr == EMBEDDED_LR["ia3"]
    # Any of --epochs / --max-steps / --lr given: that wins, the rest keep their usual defaults.
    assert (_resolved(["--epochs", "2"]).max_steps, _resolved(["--epochs", "2"]).epochs) == (-1, 2.0)
    assert _resolved(["--max-steps", "7"]).max_steps == 7
    assert _resolved(["--lr", "1e-4"]).lr == 1e-4 and _resolved(["--lr", "1e-4"]).max_steps == EMBEDDED_STEPS
    # The shipped corpus named explicitly is still the embedded default.
    assert _resolved(["--data", str(DEFAULT_DATA)]).max_steps == EMBEDDED_STEPS
    # Another model or dataset: one epoch at the usual LoRA rate.
    data = tmp_path / "d.txt"
    data.write_text("hello world\n" * 50)
    other = _resolved(["--data", str(data)])
    assert (other.max_steps, other.epochs, other.lr) == (-1, 1.0, 2e-4)
    assert _resolved(["--model", str(tmp_path)]).lr == 2e-4


def test_readme_main_job_fine_tunes_the_embedded_model(tmp_path, capsys, monkeypatch):
    """`peftfast train` with no flags but --output (the README's main job): the held-out loss falls
    clearly, the log shows loss, tokens/s and memory, and the output has an adapter, log and plot."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["train", "--output", "run"]) == 0
    printed = capsys.readouterr().out
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    losses = log["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 1.0, (first, last)
    assert log["eval_loss"] < losses[0] - 1.0, (losses[0], log["eval_loss"])
    step_lines = [ln for ln in printed.splitlines() if ln.startswith("step ")]
    assert step_lines and all("tok/s" in ln and "GiB" in ln for ln in step_lines), step_lines[:2]
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "loss.png"):
        assert (tmp_path / "run" / name).is_file(), name
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_redraws_on_a_terminal_only(monkeypatch):
    """On a terminal tqdm's bar shows the step count and the latest loss, and logged lines print above it;
    on a pipe (and off rank 0) only the logged lines are written."""
    import io

    from peftfast.cli import train as train_mod

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(train_mod.sys, "stdout", tty)
    bar = train_mod._Progress(4, 20, mininterval=0)  # resumed after step 4: the bar starts there
    assert "4/20" in tty.getvalue()
    bar.step(5, "loss 4.2000")
    drawn = tty.getvalue().rsplit("\r", 1)[-1]
    assert "5/20" in drawn and "loss 4.2000" in drawn, drawn
    bar.log("step 10/20 loss 4.0")
    # The bar is wiped before the logged line, which stands on a line of its own, and redrawn after it.
    after = tty.getvalue().split("step 10/20 loss 4.0\n")
    assert len(after) == 2 and after[0].endswith("\r") and "5/20" in after[1], tty.getvalue()
    bar.close()
    assert "5/20" not in tty.getvalue().rsplit("\r", 1)[-1]  # a closed bar leaves nothing on the last line

    pipe = io.StringIO()
    monkeypatch.setattr(train_mod.sys, "stdout", pipe)
    quiet = train_mod._Progress(0, 20, mininterval=0)  # live defaults to stdout.isatty()
    quiet.step(5, "loss 4.2")
    quiet.log("step 10/20")
    quiet.close()
    assert pipe.getvalue() == "step 10/20\n"
    off_rank_0 = train_mod._Progress(0, 20, live=False, mininterval=0)
    monkeypatch.setattr(train_mod.sys, "stdout", tty)
    before = tty.getvalue()
    off_rank_0.step(3, "loss 1.0")
    off_rank_0.close()
    assert tty.getvalue() == before


def test_bf16_loads_the_frozen_base_in_bf16_and_keeps_adapters_fp32(tmp_path):
    """--bf16 on a dense base: its frozen weights are loaded in bf16 (half of fp32's memory), the adapter
    trains and is saved in fp32, as PEFT's autocast_adapter_dtype keeps it."""
    import torch
    from safetensors import safe_open

    from peftfast.cli.basemodel import load_base

    model = load_base(None, load_in_4bit=False, compute_dtype=torch.bfloat16)["model"]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    peftfast.patch(model, peftfast.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}

    out = tmp_path / "o"
    res = train_main(["--method", "lora", "--bf16", "--max-steps", "3", "--output", str(out), *FAST])
    assert len(res["losses"]) == 3 and all(0 < l < 20 for l in res["losses"]), res["losses"]
    assert "base in bfloat16" in json.loads((out / "train_log.json").read_text())["base_model"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_bf16_defaults_to_the_device(monkeypatch):
    """Left out, --bf16 is on where a CUDA GPU has bf16 and off on a CPU; --no-bf16 / --bf16 decide."""
    import argparse

    import torch

    from peftfast.cli import train as train_mod

    p = argparse.ArgumentParser()
    train_mod.add_arguments(p)

    def resolved(argv):
        a = p.parse_args(argv)
        train_mod._resolve_defaults(a)
        return a.bf16

    assert resolved([]) is (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolved([]) is True and resolved(["--no-bf16"]) is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100 or T4
    assert resolved([]) is False and resolved(["--bf16"]) is True


def test_packing_keeps_every_trained_token_and_mask(tmp_path, capsys):
    """--packing: whole examples concatenated in order into rows of at most --seq-len; the tokens trained on
    are exactly those of the unpacked examples (prompts stay masked), none predicts an example's start."""
    import random

    from peftfast.cli.data import collate, pack_examples

    tok = byte_tokenizer()
    rng = random.Random(0)
    rows = [{"prompt": "Q" * rng.randint(1, 9), "completion": "A" * rng.randint(1, 7)} for _ in range(40)]
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_dataset(data, tok, 32)
    packed = pack_examples(examples, 32)
    assert len(packed) < len(examples) / 2 and all(len(r["input_ids"]) <= 32 for r in packed)
    assert [t for r in packed for t in r["input_ids"]] == [t for e in examples for t in e["input_ids"]]

    def trained(rows_):  # the labels the loss sees, in order
        b = collate(rows_, tok.pad_id)
        keep = b["labels"] != -100
        return b["labels"][keep].tolist()

    assert trained(packed) == [t for e in examples for t in trained([e])]
    res = train_main(["--data", str(data), "--packing", "--max-steps", "3", "--output", str(tmp_path / "o"),
                      "--method", "lora", *FAST])
    assert len(res["losses"]) == 3
    assert "packed into" in capsys.readouterr().out
    assert pack_examples([], 8) == []


def test_without_matplotlib_the_run_says_how_to_get_the_plot(tmp_path, capsys, monkeypatch):
    """matplotlib is the optional `plot` extra: without it training still saves everything else, says once
    how to get the plot, and does not claim one was written."""
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    out = tmp_path / "run"
    train_main(["--max-steps", "2", "--output", str(out), *FAST])
    printed = capsys.readouterr().out
    assert printed.count("pip install 'peftfast[plot]'") == 1
    assert "loss plot" not in printed.split("no loss plot")[-1]
    assert not (out / "loss.png").exists() and (out / "adapter_model.safetensors").is_file()


def test_loss_plot_is_drawn_from_the_losses(tmp_path):
    """The plot is a real PNG of the curve: two different loss curves give different images."""
    pytest.importorskip("matplotlib")
    from peftfast.cli.train import write_loss_plot

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert write_loss_plot([3.0, 2.0, 1.0], a, "t") and write_loss_plot([1.0, 2.0, 3.0], b, "t")
    assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and a.read_bytes() != b.read_bytes()


# ---------------------------------------------------------------------------------------------------
# Learning-rate schedule (transformers.get_scheduler) and LoRA+ (--loraplus-ratio)
# ---------------------------------------------------------------------------------------------------

def _step_lrs(argv, steps):
    """The learning rate each optimizer step of a run with ``argv`` uses, from the CLI's optimizer and schedule."""
    import torch

    from peftfast.cli.train import _optimizer

    a = _resolved(argv)
    w = torch.nn.Parameter(torch.randn(3))
    opt, sched = _optimizer(a, None, [w], steps)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_default_schedule_warms_up_then_decays_to_a_tenth():
    lr, steps = 2e-3, 40
    lrs = _step_lrs(["--lr", str(lr)], steps)
    warmup = 4  # a tenth of 40 steps
    # Linear warmup that starts above zero (no step is wasted at lr 0), then a cosine to 10% of --lr.
    assert lrs[:warmup] == pytest.approx([lr * (s + 1) / warmup for s in range(warmup)], rel=1e-12)
    assert lrs[-1] == pytest.approx(0.1 * lr, rel=1e-12)
    assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    mid = warmup + (steps - warmup) // 2 - 1  # halfway through the cosine: the middle of lr and 0.1 lr
    assert lrs[mid] == pytest.approx(0.55 * lr, rel=1e-12)
    # A 1-step run trains at the full rate; --warmup-steps and --lr-scheduler change the shape.
    assert _step_lrs(["--lr", str(lr)], 1) == [lr]
    assert _step_lrs(["--lr", str(lr), "--lr-scheduler", "constant"], 5) == [lr] * 5
    assert _step_lrs(["--lr", str(lr), "--lr-scheduler", "constant_with_warmup", "--warmup-steps", "2"], 4) == \
        pytest.approx([0.0, lr / 2, lr, lr])
    with pytest.raises(TrainError, match="--warmup-steps 9 exceeds the run's 5 steps"):
        _step_lrs(["--warmup-steps", "9"], 5)


def test_bad_schedule_flags_exit_2(tmp_path, capsys):
    for flags, message in ((["--warmup-steps", "-1"], "--warmup-steps must be 0 or more"),
                           (["--lr-scheduler", "constant", "--warmup-steps", "3"], "constant has no warmup")):
        assert cli_main(["train", *flags, "--output", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err


def _opt_groups(ckpt_dir):
    state = json.loads((ckpt_dir / "training_state.json").read_text())["optimizer"]["param_groups"]
    return [(len(g["params"]), g["initial_lr"], g["weight_decay"]) for g in state]


def test_loraplus_ratio_groups_the_optimizer_and_survives_resume(tmp_path, monkeypatch):
    import torch

    import peftfast.cli.train as train_mod
    from peftfast.cli.basemodel import build_embedded_base
    from peftfast.cli.train import TrainInterrupted
    from peftfast.optim import loraplus_param_groups

    lr, ratio = 1e-3, 8.0
    flags = ["--method", "lora", "--max-steps", "5", "--lr", str(lr), "--loraplus-ratio", str(ratio), *FAST]
    straight = train_main([*flags, "--output", str(tmp_path / "a")])
    without = [f for f in flags if f not in ("--loraplus-ratio", str(ratio))]
    plain = train_main([*without, "--output", str(tmp_path / "p")])
    # The groups are peftfast.create_loraplus_optimizer's for this run's adapter: A at lr, B at lr * ratio.
    model = peftfast.patch(build_embedded_base(), train_mod._adapter_config(_resolved(flags)))
    expected = [(len(g["names"]), g["lr"], g["weight_decay"]) for g in loraplus_param_groups(model, lr, ratio)]
    assert expected[0][0] > 0 and expected[2][0] > 0
    assert _opt_groups(tmp_path / "a" / "checkpoint-5") == expected
    assert [g[1] for g in expected] == [lr, 1e-6, lr * ratio, lr * ratio]
    assert _opt_groups(tmp_path / "p" / "checkpoint-5") == [(expected[0][0] + expected[2][0], lr, 0.0)]
    assert straight["losses"][0] == plain["losses"][0] and straight["losses"][1:] != plain["losses"][1:]

    _interrupt_at(monkeypatch, 3)
    with pytest.raises(TrainInterrupted):
        train_main([*flags, "--output", str(tmp_path / "b")])
    monkeypatch.setattr(train_mod, "_before_step", lambda step: None)
    with pytest.raises(TrainError, match=r"--loraplus-ratio 4.0 \(the run used 8.0\)"):
        train_main(["--output", str(tmp_path / "b"), "--resume", "--loraplus-ratio", "4"])
    resumed = train_main(["--output", str(tmp_path / "b"), "--resume"])  # the ratio comes from the checkpoint
    assert resumed["losses"] == straight["losses"]
    assert _opt_groups(tmp_path / "b" / "checkpoint-5") == expected
    a, b = _adapter_tensors(tmp_path / "a"), _adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "train_log.json").read_text())["args"]["loraplus_ratio"] == ratio


@pytest.mark.parametrize("flags,message", [
    (["--loraplus-ratio", "0"], "--loraplus-ratio must be a positive number, got 0.0"),
    (["--loraplus-ratio", "-2"], "--loraplus-ratio must be a positive number"),
    (["--loraplus-ratio", "nan"], "--loraplus-ratio must be a positive number, got nan"),
    (["--loraplus-ratio", "4", "--method", "ia3"], "--loraplus-ratio applies to LoRA"),
])
def test_bad_loraplus_ratio_exits_2(tmp_path, capsys, flags, message):
    assert cli_main(["train", *flags, "--output", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
