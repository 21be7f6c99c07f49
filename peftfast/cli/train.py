"""``peftfast train``: a command-line fine-tuning job (LoRA, QLoRA, DoRA, IA3, prefix and prompt tuning)
on a text or jsonl file.

Without ``--model`` it trains the embedded tiny Llama of :mod:`peftfast.cli.basemodel` (built from a config
with a fixed seed, UTF-8 byte tokenizer), so it runs anywhere with nothing downloaded. ``--model`` takes a
local transformers directory (read as is, no network) or a Hugging Face Hub model id (downloaded, or read
from the Hub cache; HF_HUB_OFFLINE=1 keeps it off the network).

Every ``--save-steps`` steps, at the end, and on Ctrl-C, a resumable checkpoint is written to
``<output>/checkpoint-<step>`` (see :mod:`peftfast.cli.resume`); ``--resume`` continues from the newest one
and gives the same adapter and losses as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from ..fileio import replace_atomically
from . import resume as ckpt
from .basemodel import BaseModelError, bf16_by_default, check_model_spec, hub_kwargs, load_failure
from .data import DataError, iterate_batches, load_dataset, pack_examples, split
from .demo import CORPUS as DEFAULT_DATA  # the shipped corpus: one path for demo and train

METHODS = ("lora", "qlora", "dora", "ia3", "prefix", "prompt")
PROMPT_METHODS = ("prefix", "prompt")
LORA_METHODS = ("lora", "qlora", "dora")
# transformers.get_scheduler names offered by --lr-scheduler: those that need only the step counts.
SCHEDULERS = ("cosine_warmup_with_min_lr", "cosine", "linear", "constant_with_warmup", "constant")
MIN_LR_RATE = 0.1  # cosine_warmup_with_min_lr ends at this fraction of --lr
DEFAULT_LR = {"ia3": 3e-3, "prefix": 1e-2, "prompt": 1e-2}  # others: 2e-4
# The embedded default (no --model, no --data, no --max-steps/--epochs/--lr): enough steps at a rate a
# 400K-parameter model needs for the loss to fall visibly in well under a minute on two CPU cores.
EMBEDDED_STEPS = 300
EMBEDDED_LR = {"ia3": 1e-2, "prefix": 3e-2, "prompt": 3e-2}  # others: 3e-3
# Flags that may differ between a run and its resumption (everything else must match the checkpoint).
RESUME_FREE = ("output", "overwrite", "resume", "logging_steps", "save_steps", "command", "func")


class TrainError(ValueError):
    """A training job that cannot start (bad flags, output directory in the way, ...)."""


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: a resumable checkpoint was written to ``checkpoint``."""

    def __init__(self, checkpoint: Path, step: int, output: str):
        super().__init__(f"interrupted after step {step}; checkpoint {checkpoint}")
        self.checkpoint, self.step, self.output = checkpoint, step, output


def _before_step(step: int) -> None:
    """Called before every optimizer step (a seam for tests that simulate Ctrl-C)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a transformers causal LM: local directory or Hugging Face Hub "
                   "id (default: the embedded tiny Llama with a byte tokenizer)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help=".txt (packed) or .jsonl with 'text', "
                   "'prompt'+'completion' or chat 'messages' (default: the shipped corpus)")
    p.add_argument("--method", choices=METHODS, default="qlora")
    p.add_argument("--num-virtual-tokens", type=int, default=16, help="virtual tokens for --method prefix/prompt")
    p.add_argument("--target-modules", default="all-linear", help="comma list or all-linear")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --epochs when > 0)")
    p.add_argument("--epochs", type=float, default=None,
                   help=f"passes over the training split (default: 1; the embedded default model and data "
                   f"with neither --epochs nor --max-steps: {EMBEDDED_STEPS} steps)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: 2e-4; 3e-3 for ia3; 1e-2 for prefix/prompt; 15x these, capped "
                   "at 3e-2, for the embedded default model and data)")
    p.add_argument("--lr-scheduler", choices=SCHEDULERS, default=SCHEDULERS[0],
                   help="transformers.get_scheduler schedule (default: linear warmup, then a cosine down to "
                   f"{MIN_LR_RATE:g} x --lr at the last step)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup steps (default: a tenth of the steps, at least 1, at most 10)")
    p.add_argument("--loraplus-ratio", type=float, default=None, metavar="R",
                   help="LoRA+ (lora/qlora/dora): the lora_B matrices train at R x --lr "
                   "(peftfast.create_loraplus_optimizer; the LoRA+ paper uses 2-16). Default: off")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--packing", action="store_true", help="jsonl: concatenate whole training examples into rows "
                   "of up to --seq-len tokens (fewer pad tokens; examples in a row attend to each other). "
                   "Text files are always packed")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast, and the frozen base in bf16 (bf16 weights, or bf16 compute for a 4-bit "
                   "base); adapters stay fp32 (default: on for a CUDA GPU with bf16, off on a CPU)")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--save-steps", type=int, default=100, help="write a resumable checkpoint every N steps "
                   "(and at the end, and on Ctrl-C) to OUTPUT/checkpoint-STEP; only the newest is kept")
    p.add_argument("--output", default="out/train")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --output directory")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue from the newest checkpoint in --output (or in DIR, or the checkpoint DIR itself) "
                   "with the settings saved in it")
    p.add_argument("--seed", type=int, default=0, help="adapter init, data order and dropout (the embedded "
                   "base model is always the same)")


def _check_args(a) -> None:
    for name in ("r", "batch_size", "grad_accum", "seq_len", "logging_steps", "save_steps", "num_virtual_tokens"):
        if getattr(a, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.max_steps == 0 or a.max_steps < -1:
        raise TrainError(f"--max-steps must be at least 1 (or -1, the default: train for --epochs), got {a.max_steps}")
    if a.epochs is not None and not (a.epochs > 0 and math.isfinite(a.epochs)):
        raise TrainError(f"--epochs must be a positive number, got {a.epochs}")
    if a.lr is not None and not (a.lr > 0 and math.isfinite(a.lr)):
        raise TrainError(f"--lr must be a positive number, got {a.lr}")
    if a.loraplus_ratio is not None:
        if not (a.loraplus_ratio > 0 and math.isfinite(a.loraplus_ratio)):
            raise TrainError(f"--loraplus-ratio must be a positive number, got {a.loraplus_ratio}")
        if a.method not in LORA_METHODS:
            raise TrainError(f"--loraplus-ratio applies to LoRA (--method {'/'.join(LORA_METHODS)}), not to --method "
                             f"{a.method}; drop the flag")
    if a.warmup_steps is not None and a.warmup_steps < 0:
        raise TrainError(f"--warmup-steps must be 0 or more, got {a.warmup_steps}")
    if a.warmup_steps and a.lr_scheduler == "constant":
        raise TrainError("--lr-scheduler constant has no warmup; use constant_with_warmup, or drop --warmup-steps")
    if not math.isfinite(a.alpha):
        raise TrainError(f"--alpha must be a finite number, got {a.alpha}")
    if not 0 <= a.dropout < 1:
        raise TrainError(f"--dropout must be in [0, 1), got {a.dropout}")
    if not 0 < a.eval_fraction < 1:
        raise TrainError(f"--eval-fraction must be in (0, 1), got {a.eval_fraction}")
    out = Path(a.output)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not a.overwrite and a.resume is None:
        raise TrainError(f"--output {out} exists and is not empty; pass --overwrite to write into it, "
                         "or --resume to continue the run saved there")
    try:
        check_model_spec(a.model)
    except BaseModelError as e:
        raise TrainError(str(e)) from None


def _is_embedded_default(a) -> bool:
    """No --model and the shipped corpus: the README's main job on the tiny built-in Llama."""
    return a.model is None and Path(a.data).resolve() == DEFAULT_DATA.resolve()


def _resolve_defaults(a) -> None:
    """Fill the length, learning rate and bf16 choice the user left out (a resumed run has them from its
    checkpoint).

    Real models train at the usual LoRA rates for one epoch; the embedded tiny model gets its own recipe
    (:data:`EMBEDDED_STEPS`, :data:`EMBEDDED_LR`), else its loss would barely move in the 10 steps one
    epoch of the shipped corpus is.
    """
    embedded = _is_embedded_default(a)
    if a.epochs is None:
        a.epochs = 1.0
        if embedded and a.max_steps <= 0:
            a.max_steps = EMBEDDED_STEPS
    if a.lr is None:
        a.lr = (EMBEDDED_LR.get(a.method, 3e-3) if embedded else DEFAULT_LR.get(a.method, 2e-4))
    if a.bf16 is None:
        a.bf16 = bf16_by_default()


def _max_positions(a) -> Optional[int]:
    if a.model is None:
        from .demo import tiny_llama_config

        return tiny_llama_config().max_position_embeddings
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(a.model, **hub_kwargs(a.model))
    except (OSError, ValueError) as e:
        raise TrainError(str(load_failure(a.model, e))) from None
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    return None


def _check_seq_len(a) -> None:
    limit = _max_positions(a)
    extra = a.num_virtual_tokens if a.method in PROMPT_METHODS else 0
    if limit is not None and a.seq_len + extra > limit:
        what = f"--seq-len {a.seq_len}" + (f" + {extra} virtual tokens" if extra else "")
        raise TrainError(f"{what} exceeds the model's {limit} positions (max_position_embeddings); "
                         f"use --seq-len {limit - extra} or less")


def _parser_defaults() -> dict:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return vars(p.parse_args([]))


def _resume_args(a, saved: dict, where: Path):
    """The run's saved settings; a flag set on this command line to something else is an error."""
    defaults = _parser_defaults()
    clash = []
    for key, value in saved.items():
        if key in RESUME_FREE or not hasattr(a, key):
            continue
        mine = getattr(a, key)
        if mine != value and mine != defaults.get(key):
            clash.append(f"--{key.replace('_', '-')} {mine} (the run used {value})")
        setattr(a, key, value)
    if clash:
        raise TrainError(f"cannot resume {where} with other settings: {', '.join(clash)}; drop these flags, or "
                         "start a new run in another --output")
    return a


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

    if a.method == "prefix":
        return peftfast.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=a.num_virtual_tokens)
    if a.method == "prompt":
        return peftfast.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=a.num_virtual_tokens)
    targets = _targets(a.target_modules)
    if a.method == "ia3":
        if targets == "all-linear":
            return peftfast.IA3Config(target_modules="all-linear", task_type="CAUSAL_LM")
        ff = [m for m in targets if m in ("down_proj", "fc2", "c_proj", "w2", "dense_4h_to_h", "fc_out")]
        return peftfast.IA3Config(target_modules=targets, feedforward_modules=ff, task_type="CAUSAL_LM")
    return peftfast.LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=targets,
                               use_dora=a.method == "dora", task_type="CAUSAL_LM")


def _load_model(a, device: str) -> dict:
    """The base model and tokenizer (see :func:`peftfast.cli.basemodel.load_base`)."""
    from .basemodel import load_base

    compute = torch.bfloat16 if a.bf16 else torch.float32
    try:
        return load_base(a.model, load_in_4bit=a.method == "qlora", device=device, compute_dtype=compute)
    except BaseModelError as e:
        raise TrainError(str(e)) from None


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
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            loss = model(**b).loss
        total += loss.float().item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _memory(device: str) -> str:
    """Peak memory so far: allocated by PyTorch on a GPU, the process's resident set on a CPU."""
    if device.startswith("cuda"):
        return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    try:
        import resource
    except ImportError:  # Windows
        return ""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    return f"peak RSS {rss / (2**30 if sys.platform == 'darwin' else 2**20):.2f} GiB"


class _Progress:
    """tqdm's progress bar (steps, elapsed, ETA, the latest loss) on a terminal, redrawn below the logged
    lines; no bar where stdout is a file or a pipe, or off rank 0 (logs stay one line per ``--logging-steps``).

    Args:
        done: steps already taken (a resumed run's bar starts there).
        steps: the run's total steps.
        live: draw the bar (default: on rank 0 when stdout is a terminal).
        **tqdm_kwargs: passed to ``tqdm`` (tests use ``mininterval=0``).
    """

    def __init__(self, done: int, steps: int, live: Optional[bool] = None, **tqdm_kwargs):
        from tqdm import tqdm

        self._tqdm = tqdm
        live = sys.stdout.isatty() if live is None else live
        # file=sys.stdout as it is now: off rank 0 that is os.devnull (see distributed.Ranks.start).
        self.bar = tqdm(total=steps, initial=done, disable=not live, file=sys.stdout, leave=False, unit="step",
                        desc="train", **tqdm_kwargs)

    def step(self, step: int, status: str) -> None:
        """Step ``step`` is done; ``status`` (loss, lr) goes beside the bar."""
        self.bar.set_postfix_str(status, refresh=False)
        self.bar.update(step - self.bar.n)

    def log(self, line: str) -> None:
        """Print ``line`` above the bar (or plainly, where there is none)."""
        self._tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()


_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM") if hasattr(signal, n))


class _DeferSigint:
    """Hold Ctrl-C and SIGTERM back while the optimizer updates the weights (a half-applied step cannot be
    checkpointed) or while the emergency checkpoint is written (a second Ctrl-C must not cost the run its
    checkpoint); the interrupt is raised right after, unless ``reraise`` is False. A no-op outside the
    main thread."""

    def __init__(self, reraise: bool = True):
        self.reraise = reraise

    def __enter__(self):
        self.pending, self.previous = False, {}
        if threading.current_thread() is threading.main_thread():
            def hold(signum, frame):
                self.pending = True
            for sig in _STOP_SIGNALS:
                try:
                    self.previous[sig] = signal.signal(sig, hold)
                except (ValueError, OSError):  # pragma: no cover - embedded interpreters
                    pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.pending and self.reraise and exc[0] is None:
            raise KeyboardInterrupt
        return False


class _SigtermAsInterrupt:
    """Treat SIGTERM (``timeout``, ``docker stop``, SLURM preemption) as Ctrl-C while training, so the run
    ends with a resumable checkpoint instead of dying without one. A no-op outside the main thread."""

    def __enter__(self):
        self.previous = None
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            def interrupt(signum, frame):
                raise KeyboardInterrupt
            try:
                self.previous = signal.signal(signal.SIGTERM, interrupt)
            except (ValueError, OSError):  # pragma: no cover - embedded interpreters
                self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def _saved_args(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "command", "resume", "overwrite")}


def run_train(args) -> dict:
    """Run a training job from parsed arguments (see :func:`add_arguments`).

    Under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1) it trains data-parallel: ``--batch-size``
    is per process, and rank 0 alone prints and writes (see :mod:`peftfast.cli.distributed`).

    Returns:
        A dict with ``losses`` (one per optimizer step), ``eval_loss``, ``output``, ``steps`` and
        ``checkpoint`` (the last resumable checkpoint).

    Raises:
        TrainError / DataError: on bad flags, an output directory in the way, or unusable data.
        TrainInterrupted: on Ctrl-C, after writing a resumable checkpoint (a KeyboardInterrupt).
    """
    from .distributed import Ranks

    ranks = Ranks()  # joins the launcher's process group, if any
    ranks.start()
    try:
        return _run_train(args, ranks)
    finally:
        ranks.stop()


def _run_train(args, ranks) -> dict:
    import peftfast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    _check_args(args)
    state_tensors, meta = None, None
    if args.resume is not None:
        where = Path(args.resume or args.output)
        found = ckpt.find_checkpoint(where)
        if found is None:
            raise TrainError(f"--resume: no checkpoint-* with a training state in {where}; nothing to resume")
        try:
            state_tensors, meta = ckpt.read_checkpoint(found)
            meta["args"], meta["step"], meta["losses"]  # noqa: B018 - a truncated JSON may lack them
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TrainError(f"--resume: cannot read {found}: {e}") from None
        args = _resume_args(args, meta["args"], found)
        _check_args(args)
        print(f"resuming from {found} (step {meta['step']})")
    _resolve_defaults(args)
    _check_seq_len(args)
    config = _adapter_config(args)
    device = ranks.device()
    torch.manual_seed(args.seed)
    t_start = time.time()

    loaded = _load_model(args, device)
    model, tok, desc = loaded["model"], loaded["tokenizer"], loaded["desc"]
    examples = load_dataset(args.data, tok, args.seq_len)
    train_set, eval_set = split(examples, args.eval_fraction, args.seed)
    n_train, packed = len(train_set), ""
    if args.packing and Path(args.data).suffix.lower() == ".jsonl":
        train_set = pack_examples(train_set, args.seq_len)
        packed = f", packed into {len(train_set)} rows"
    print(f"base: {desc}")
    print(f"data: {args.data}: {n_train} training{packed} / {len(eval_set)} held-out examples "
          f"(seq-len {args.seq_len})")
    try:
        peftfast.patch(model, config)
    except ValueError as e:  # ConfigError: --target-modules matching nothing, an unsupported layer, ...
        raise TrainError(f"--target-modules {args.target_modules}: {e}" if _uses_target_modules(args) else str(e)) from None
    peftfast.print_trainable_parameters(model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    train_model = ranks.wrap(model, device)

    per_epoch = math.ceil(len(train_set) / (args.batch_size * args.grad_accum))
    steps = args.max_steps if args.max_steps > 0 else max(1, math.ceil(per_epoch * args.epochs))
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = _optimizer(args, model, params, steps)

    out = Path(args.output)
    losses, done = [], 0
    if meta is None:
        for old in ckpt.checkpoints(out):  # --overwrite: a fresh run must not resume someone else's state
            print(f"note: removing {old} of an earlier run (--overwrite)")
            shutil.rmtree(old, ignore_errors=True)
    if meta is not None:
        _restore_adapter(model, found)
        ckpt.restore_optimizer(opt, state_tensors, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        ckpt.set_rng_state(state_tensors)
        losses, done = list(meta["losses"]), int(meta["step"])
    # Every rank walks the same global batches and keeps its own rows of each.
    batches = iterate_batches(train_set, args.batch_size * ranks.world, tok.pad_id, args.seed,
                              skip=done * args.grad_accum)
    loraplus = f", LoRA+ lora_B at {args.loraplus_ratio:g}x" if args.loraplus_ratio is not None else ""
    print(f"training: {args.method}, {steps} steps, batch {args.batch_size} x accum {args.grad_accum}, "
          f"lr {args.lr:g} ({args.lr_scheduler}, warmup {_warmup(args, steps)}{loraplus}), device {device}"
          f"{', bf16' if args.bf16 else ''}"
          + (f", from step {done}" if done else ""))

    run_meta = {"args": _saved_args(args), "base_sha256": loaded["fingerprint"], "method": args.method}
    last_ckpt = found if meta is not None else None

    def save(step: int, rng: dict, wait: bool = True) -> Path:
        path = out / f"checkpoint-{step}"
        if ranks.is_main:
            try:
                path = ckpt.save_checkpoint(out, step, model, opt, sched, rng, dict(
                    run_meta, losses=losses, batches_consumed=step * args.grad_accum))
            except OSError as e:  # disk full, quota, permissions: the previous checkpoint is intact
                kept = f"; the previous checkpoint {last_ckpt} is intact" if last_ckpt else ""
                raise TrainError(f"cannot write the checkpoint of step {step} in {out}: {e.strerror or e}{kept}. "
                                 "Free space (or fix the permissions) and resume with --resume") from None
        if wait:
            ranks.barrier()
        return path

    rng_next = ckpt.rng_state()  # the RNG state at the start of step done + 1
    progress = _Progress(done, steps, live=ranks.is_main and sys.stdout.isatty())
    model.train()
    t_log, tok_log = time.time(), 0
    stop_signals = _SigtermAsInterrupt()
    stop_signals.__enter__()
    try:
        for step in range(done + 1, steps + 1):
            _before_step(step)
            micro = [(e, ranks.shard(b)) for e, b in (next(batches) for _ in range(args.grad_accum))]
            n_tok = [int((b["labels"][:, 1:] != -100).sum()) for _, b in micro]
            # Weighted by the global token count (DDP averages gradients over ranks, hence * world).
            total_tok = max(ranks.total(sum(n_tok)), 1)
            step_loss = 0.0
            for (epoch, b), n in zip(micro, n_tok):
                b = {k: v.to(device) for k, v in b.items()}
                with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=args.bf16):
                    loss = train_model(**b).loss  # prompt tuning: the model pads the labels for its virtual tokens
                if n == 0:
                    if ranks.enabled:  # DDP needs every rank's backward: contribute zero gradients
                        (sum(p.sum() for p in params) * 0.0).backward()
                    continue
                (loss.float() * (n * ranks.world / total_tok)).backward()
                step_loss += loss.float().item() * n / total_tok
                tok_log += int(b["attention_mask"].sum())
            step_loss = ranks.total(step_loss)
            if not math.isfinite(step_loss):
                raise TrainError(_non_finite_loss(model, step_loss, step, done, last_ckpt))
            with _DeferSigint():
                lr_now = sched.get_last_lr()[0]  # the rate this step uses (of the first group: lora_A's)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(step_loss)
                done = step
                rng_next = ckpt.rng_state()
            if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):  # one sync
                bad = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
                # The loss was finite but the update was not (fp16 overflow, a huge --lr): stop before a
                # checkpoint or the adapter stores NaN.
                raise TrainError(f"the adapter's weights hold NaN/Inf after step {step} (e.g. {bad[:2]}); lower "
                                 "--lr, or train in bf16 or fp32. " + (f"The last good checkpoint is {last_ckpt}"
                                                                       if last_ckpt else "No checkpoint was written"))
            progress.step(step, f"loss {step_loss:.4f} lr {lr_now:.2e}")
            if step == 1 or step % args.logging_steps == 0 or step == steps:
                dt = max(time.time() - t_log, 1e-9)
                progress.log(f"step {step:5d}/{steps}  epoch {epoch + 1}  loss {step_loss:.4f}  "
                             f"lr {lr_now:.2e}  {tok_log / dt:,.0f} tok/s  {_memory(device)}")
                t_log, tok_log = time.time(), 0
            if step % args.save_steps == 0 or step == steps:
                last_ckpt = save(step, rng_next)

        progress.close()
        eval_loss = evaluate(model, eval_set, args.batch_size, tok.pad_id, device, args.bf16)
    except KeyboardInterrupt:
        with _DeferSigint(reraise=False):  # the run is stopping anyway; more signals must not cut the checkpoint
            progress.close()
            opt.zero_grad(set_to_none=True)  # drop the half-accumulated step; the checkpoint is of step `done`
            if last_ckpt is None or last_ckpt.name != f"checkpoint-{done}":
                last_ckpt = save(done, rng_next, wait=False)
        print(f"\ninterrupted: checkpoint of step {done}/{steps} saved to {last_ckpt}\n"
              f"resume with: peftfast train --output {out} --resume", flush=True)
        raise TrainInterrupted(last_ckpt, done, str(out)) from None
    finally:
        progress.close()  # also on an error: a bar left on the terminal would garble the message below it
        stop_signals.__exit__(None, None, None)
    print(f"eval loss {eval_loss:.4f} (perplexity {math.exp(min(eval_loss, 50)):.2f}) "
          f"on {len(eval_set)} held-out examples")

    plotted = False
    if ranks.is_main:
        plotted = _write_outputs(peftfast, model, out, losses, eval_loss, steps, args, loaded, meta,
                                 found if meta else None)
    ranks.barrier()
    plot = f", loss plot {out / 'loss.png'}" if plotted else ""
    print(f"adapter saved to {out}{plot}; resumable checkpoint {last_ckpt}")
    print(f"done in {time.time() - t_start:.1f} s")
    return {"losses": losses, "eval_loss": eval_loss, "output": os.path.abspath(out), "steps": steps,
            "checkpoint": str(last_ckpt)}


def default_warmup(steps: int) -> int:
    """A tenth of the run, at least 1 step and at most 10."""
    return min(10, max(1, steps // 10))


def _warmup(args, steps: int) -> int:
    return default_warmup(steps) if args.warmup_steps is None else args.warmup_steps


def _optimizer(args, model, params: list, steps: int) -> tuple:
    """AdamW (no weight decay; LoRA+ groups with --loraplus-ratio) and its transformers.get_scheduler schedule."""
    from transformers import get_scheduler

    import peftfast

    if args.loraplus_ratio is not None:
        opt = peftfast.create_loraplus_optimizer(model, torch.optim.AdamW, lr=args.lr,
                                                 loraplus_lr_ratio=args.loraplus_ratio, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = _warmup(args, steps)
    if warmup > steps:
        raise TrainError(f"--warmup-steps {warmup} exceeds the run's {steps} steps")
    if args.lr_scheduler == "constant":
        return opt, get_scheduler("constant", opt)
    extra = {"min_lr_rate": MIN_LR_RATE} if args.lr_scheduler == "cosine_warmup_with_min_lr" else None
    return opt, get_scheduler(args.lr_scheduler, opt, num_warmup_steps=warmup, num_training_steps=steps,
                              scheduler_specific_kwargs=extra)


def _uses_target_modules(args) -> bool:
    """Whether the run's adapter uses --target-modules (the prompt-learning methods do not)."""
    return args.method not in PROMPT_METHODS


def _non_finite_loss(model, loss: float, step: int, done: int, last_ckpt) -> str:
    """Why the loss is NaN/Inf: a base weight that already is (no learning rate fixes that), the first step
    before any update (the model or the data), or a diverging run."""
    bad_base = next((n for n, p in model.named_parameters()
                     if not p.requires_grad and p.is_floating_point() and not bool(torch.isfinite(p).all())), None)
    if bad_base is not None:
        return (f"loss is {loss} at step {step}: the base model's weights hold NaN/Inf (e.g. {bad_base}); the model "
                "files are damaged or were saved after an overflow. Re-download or re-export the model")
    if done == 0 and step == 1:
        return (f"loss is {loss} at step 1, before any update: the model gives NaN/Inf on this data (try fp32, "
                "i.e. --no-bf16, or check the model's files); the learning rate is not the cause")
    where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
    return f"loss is {loss} at step {step}; try a lower --lr{where}"


def write_loss_plot(losses: list, path: Path, title: str) -> bool:
    """Plot the per-step training loss to ``path`` (PNG) with matplotlib; False, saying once how to get the
    plot, when matplotlib is not installed (it is the optional ``plot`` extra: ``pip install 'peftfast[plot]'``).

    Example:
        >>> write_loss_plot([2.3, 1.9, 1.4], Path("out/loss.png"), "lora")  # doctest: +SKIP
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed, and none is touched
        import matplotlib.pyplot as plt
    except ImportError:
        print("no loss plot: matplotlib is not installed (pip install 'peftfast[plot]'); "
              "the losses are in train_log.json")
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with replace_atomically(path) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return True


def _write_outputs(peftfast, model, out: Path, losses, eval_loss, steps, args, loaded, meta, found) -> bool:
    peftfast.save_adapter(model, str(out))
    with replace_atomically(out / "train_log.json", text=True) as f:
        json.dump({"losses": losses, "eval_loss": eval_loss, "steps": steps, "method": args.method,
                   "base_model": loaded["desc"], "base_sha256": loaded["fingerprint"],
                   "resumed_from": str(found) if meta is not None else None,
                   "args": _saved_args(args)}, f, indent=1)
    return write_loss_plot(losses, out / "loss.png", f"{args.method}: training loss (eval {eval_loss:.3f})")


def _restore_adapter(model, path: Path) -> None:
    """Copy a checkpoint's adapter tensors into the freshly patched (trainable) adapter, exactly."""
    from ..checkpoint import adapter_state_dict, read_adapter_weights

    saved = read_adapter_weights(str(path))
    mine = adapter_state_dict(model)
    if set(saved) != set(mine):
        raise TrainError(f"{path}: its adapter tensors do not match this run's adapter "
                         f"(e.g. {sorted(set(saved) ^ set(mine))[:3]})")
    with torch.no_grad():
        for k, t in mine.items():
            if tuple(t.shape) != tuple(saved[k].shape):
                raise TrainError(f"{path}: {k} has shape {tuple(saved[k].shape)}, this run's is {tuple(t.shape)}")
            t.copy_(saved[k].to(t.dtype))


def main(argv: Optional[list] = None) -> dict:
    """Parse ``argv`` as ``peftfast train`` flags and run (for tests and scripts)."""
    p = argparse.ArgumentParser(prog="peftfast train")
    add_arguments(p)
    return run_train(p.parse_args(argv))


__all__ = ["DataError", "TrainError", "TrainInterrupted", "add_arguments", "evaluate", "main", "run_train"]
