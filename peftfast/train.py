"""``peftfast train``: a command-line fine-tuning job (LoRA, QLoRA, DoRA, IA3) on a text or jsonl file.

Without ``--model`` it trains the embedded tiny Llama of :mod:`peftfast.demo` (built from a config, UTF-8
byte tokenizer), so it runs anywhere with nothing downloaded. With ``--model DIR`` it loads
``AutoTokenizer``/``AutoModelForCausalLM`` from that local directory (no network).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from .data import DataError, byte_tokenizer, hf_tokenizer, iterate_batches, load_dataset, split

DEFAULT_DATA = Path(__file__).parent / "data" / "corpus.txt"
METHODS = ("lora", "qlora", "dora", "ia3")


class TrainError(ValueError):
    """A training job that cannot start (bad flags, output directory in the way, ...)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local directory of a transformers causal LM "
                   "(default: the embedded tiny Llama with a byte tokenizer)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help=".txt (packed) or .jsonl with 'text' or "
                   "'prompt'+'completion' (default: the shipped corpus)")
    p.add_argument("--method", choices=METHODS, default="qlora")
    p.add_argument("--target-modules", default="all-linear", help="comma list or all-linear")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --epochs when > 0)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (and bf16 compute for the 4-bit base)")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--output", default="out/train")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --output directory")
    p.add_argument("--seed", type=int, default=0)


def _check_args(a) -> None:
    for name in ("r", "batch_size", "grad_accum", "seq_len", "logging_steps"):
        if getattr(a, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.max_steps <= 0 and a.epochs <= 0:
        raise TrainError("give --max-steps > 0 or --epochs > 0")
    if a.lr <= 0:
        raise TrainError(f"--lr must be positive, got {a.lr}")
    if not 0 <= a.dropout < 1:
        raise TrainError(f"--dropout must be in [0, 1), got {a.dropout}")
    if not 0 < a.eval_fraction < 1:
        raise TrainError(f"--eval-fraction must be in (0, 1), got {a.eval_fraction}")
    out = Path(a.output)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not a.overwrite:
        raise TrainError(f"--output {out} exists and is not empty; pass --overwrite to write into it")
    if a.model is not None and not Path(a.model).is_dir():
        raise TrainError(f"--model {a.model}: not a local directory with a transformers model")


def _targets(spec: str):
    spec = spec.strip()
    if spec in ("all-linear", "all_linear"):
        return "all-linear"
    mods = [m.strip() for m in spec.split(",") if m.strip()]
    if not mods:
        raise TrainError("--target-modules is empty")
    return mods


def _adapter_config(a):
    import peftfast

    targets = _targets(a.target_modules)
    if a.method == "ia3":
        if targets == "all-linear":
            return peftfast.IA3Config(target_modules="all-linear", task_type="CAUSAL_LM")
        ff = [m for m in targets if m in ("down_proj", "fc2", "c_proj", "w2", "dense_4h_to_h", "fc_out")]
        return peftfast.IA3Config(target_modules=targets, feedforward_modules=ff, task_type="CAUSAL_LM")
    return peftfast.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=targets,
                               use_dora=a.method == "dora", task_type="CAUSAL_LM")


def _load_model(a, device: str, tmp: str):
    """Return (model, tokenizer, base description)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if a.bf16 else torch.float32
    if a.model is None:
        from transformers import LlamaForCausalLM

        from .demo import tiny_llama_config

        LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp)
        model_dir, tok, desc = tmp, byte_tokenizer(), "embedded tiny Llama (byte tokenizer)"
    else:
        from transformers import AutoTokenizer

        model_dir, desc = a.model, a.model
        tok = hf_tokenizer(AutoTokenizer.from_pretrained(a.model, local_files_only=True))
    kwargs = {"local_files_only": True}
    if a.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        kwargs["device_map"] = device
        desc += ", base in NF4 (bitsandbytes)"
    else:
        kwargs["dtype"] = torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if a.method != "qlora":
        model.to(device)
    return model, tok, desc


@torch.no_grad()
def evaluate(model, examples, batch_size: int, pad_id: int, device: str, bf16: bool) -> float:
    """Token-weighted mean loss over ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        from .data import collate

        b = {k: v.to(device) for k, v in collate(examples[i: i + batch_size], pad_id).items()}
        n = int((b["labels"][:, 1:] != -100).sum())
        if n == 0:
            continue
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**b).loss
        total += loss.float().item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _plot(losses: list, path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no loss plot written")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_train(args) -> dict:
    """Run a training job from parsed arguments (see :func:`add_arguments`).

    Returns:
        A dict with ``losses`` (one per optimizer step), ``eval_loss``, ``output`` and ``steps``.

    Raises:
        TrainError / DataError: on bad flags, an output directory in the way, or unusable data.
    """
    import peftfast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    _check_args(args)
    config = _adapter_config(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    t_start = time.time()

    with tempfile.TemporaryDirectory() as tmp:
        model, tok, desc = _load_model(args, device, tmp)
        examples = load_dataset(args.data, tok, args.seq_len)
        train_set, eval_set = split(examples, args.eval_fraction, args.seed)
        print(f"base: {desc}")
        print(f"data: {args.data}: {len(train_set)} training / {len(eval_set)} held-out examples "
              f"(seq-len {args.seq_len})")
        peftfast.patch(model, config)
        peftfast.print_trainable_parameters(model)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

        per_epoch = math.ceil(len(train_set) / (args.batch_size * args.grad_accum))
        steps = args.max_steps if args.max_steps > 0 else max(1, math.ceil(per_epoch * args.epochs))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        warmup = min(10, max(1, steps // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
        batches = iterate_batches(train_set, args.batch_size, tok.pad_id, args.seed)
        print(f"training: {args.method}, {steps} steps, batch {args.batch_size} x accum {args.grad_accum}, "
              f"lr {args.lr:g}, device {device}")

        losses = []
        model.train()
        t_log, tok_log = time.time(), 0
        for step in range(1, steps + 1):
            micro = [next(batches) for _ in range(args.grad_accum)]
            n_tok = [int((b["labels"][:, 1:] != -100).sum()) for _, b in micro]
            total_tok = max(sum(n_tok), 1)
            step_loss = 0.0
            for (epoch, b), n in zip(micro, n_tok):
                b = {k: v.to(device) for k, v in b.items()}
                with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.bf16):
                    loss = model(**b).loss
                if n == 0:
                    continue
                (loss.float() * (n / total_tok)).backward()
                step_loss += loss.float().item() * n / total_tok
                tok_log += int(b["attention_mask"].sum())
            if not math.isfinite(step_loss):
                raise TrainError(f"loss is {step_loss} at step {step}; try a lower --lr")
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
            if step == 1 or step % args.logging_steps == 0 or step == steps:
                dt = max(time.time() - t_log, 1e-9)
                print(f"step {step:5d}/{steps}  epoch {epoch + 1}  loss {step_loss:.4f}  "
                      f"lr {sched.get_last_lr()[0]:.2e}  {tok_log / dt:,.0f} tok/s", flush=True)
                t_log, tok_log = time.time(), 0

        eval_loss = evaluate(model, eval_set, args.batch_size, tok.pad_id, device, args.bf16)
        print(f"eval loss {eval_loss:.4f} (perplexity {math.exp(min(eval_loss, 50)):.2f}) "
              f"on {len(eval_set)} held-out examples")

        out = Path(args.output)
        peftfast.save_adapter(model, str(out))
        with open(out / "train_log.json", "w") as f:
            json.dump({"losses": losses, "eval_loss": eval_loss, "steps": steps, "method": args.method,
                       "args": {k: v for k, v in vars(args).items() if k != "func"}}, f, indent=1)
        plot = _plot(losses, out / "loss.png")
        print(f"adapter saved to {out}" + (f", loss plot {plot}" if plot else ""))
    print(f"done in {time.time() - t_start:.1f} s")
    return {"losses": losses, "eval_loss": eval_loss, "output": os.path.abspath(out), "steps": steps}


def main(argv: Optional[list] = None) -> dict:
    """Parse ``argv`` as ``peftfast train`` flags and run (for tests and scripts)."""
    p = argparse.ArgumentParser(prog="peftfast train")
    add_arguments(p)
    return run_train(p.parse_args(argv))


__all__ = ["DataError", "TrainError", "add_arguments", "evaluate", "main", "run_train"]
