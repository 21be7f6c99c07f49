"""``peftfast generate``: text from a base model plus an adapter (greedy, or sampled with --temperature).

Without ``--model`` the base is the one the adapter names (``base_model_name_or_path``): the embedded tiny
Llama for adapters saved by ``peftfast train`` / ``peftfast demo`` without ``--model``, a local
directory or a Hugging Face Hub model id. The base is loaded in NF4 when the adapter was trained with ``--method qlora`` (from its
``train_log.json``), so the logits are those the adapter was trained against; ``--load-in-4bit`` /
``--no-load-in-4bit`` override that.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch


class GenerateError(ValueError):
    """Bad flags or an adapter that does not fit."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="the base model: local transformers directory or Hub id (default: the "
                   "adapter's base_model_name_or_path; the embedded tiny Llama for `peftfast train` adapters)")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap --prompt as a user turn of the chat template "
                   "(the tokenizer's, or peftfast's own for the byte tokenizer)")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="load the base in NF4 (default: as the adapter was trained)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="decode with a static KV cache and the decode step captured as a CUDA graph (torch.compile "
                   "mode reduce-overhead), so per-token host work does not bound the speed (default: on for a "
                   "CUDA GPU, except for prompt-learning adapters, whose prefix lives in a dynamic cache)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="compute in bf16: a dense base loaded in bf16, a 4-bit one computing in it (default: on "
                   "for a CUDA GPU with bf16, off on a CPU)")


def load_with_adapter(model_dir: Optional[str], adapter: str, load_in_4bit: Optional[bool], device: str = "cpu",
                      compute_dtype=torch.float32) -> dict:
    """Base (resolved as in :func:`peftfast.cli.basemodel.resolve_base`) with the adapter loaded, in eval mode
    (``compute_dtype`` as :func:`peftfast.cli.basemodel.load_base` takes it)."""
    import os

    import peftfast

    from .basemodel import BaseModelError, check_embedded, check_model_spec, load_base, resolve_base

    if not os.path.isdir(adapter):
        raise GenerateError(f"--adapter {adapter}: no such directory")
    try:
        check_model_spec(model_dir)
        model_dir, four_bit, log = resolve_base(model_dir, adapter, load_in_4bit)
        loaded = load_base(model_dir, load_in_4bit=four_bit, device=device, compute_dtype=compute_dtype)
    except (FileNotFoundError, BaseModelError) as e:
        raise GenerateError(str(e)) from None
    try:
        check_embedded(loaded["fingerprint"], log)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    peftfast.load_adapter(loaded["model"], adapter)
    loaded["model"].eval()
    loaded["load_in_4bit"] = four_bit
    return loaded


def encode_prompt(loaded: dict, prompt: str, chat: bool) -> list:
    from .data import builtin_chat_text

    tok = loaded["tokenizer"]
    if not chat:
        return tok.encode(prompt, True)
    messages = [{"role": "user", "content": prompt}]
    if tok.render_chat is not None:
        return tok.encode(tok.render_chat(messages, True), False)
    return tok.encode(builtin_chat_text(messages, add_generation_prompt=True), True)


def decode(loaded: dict, ids: list) -> str:
    if loaded["hf_tokenizer"] is None:
        return loaded["tokenizer"].decode(ids)
    return loaded["hf_tokenizer"].decode(ids, skip_special_tokens=True)


def graph_decode_kwargs(mode: str = "reduce-overhead", *, all_devices: bool = False) -> dict:
    """``model.generate`` keyword arguments that run each decode step as one captured CUDA graph.

    A static KV cache gives every step the same shapes and addresses, so transformers compiles the forward
    once (peftfast's kernels are ``torch.library`` ops that trace without graph breaks) and, in the
    ``reduce-overhead`` mode, replays it as a CUDA graph: the Python work of a few hundred adapter layers
    per token is paid at capture, not at every token. transformers applies it on CUDA only, unless
    ``all_devices`` (a test's way to check the same compile on a CPU).

    Args:
        mode: the ``torch.compile`` mode; ``reduce-overhead`` is the one that captures CUDA graphs.
        all_devices: compile on any device (transformers otherwise compiles on accelerators only).

    Returns:
        A dict to pass to ``model.generate(**...)``.

    Example:
        >>> out = model.generate(ids, max_new_tokens=64, **graph_decode_kwargs())  # doctest: +SKIP
    """
    from transformers.generation.configuration_utils import CompileConfig

    config = CompileConfig(fullgraph=True, mode=mode)
    if all_devices:
        config._compile_all_devices = True  # transformers' own switch for compiling off-accelerator
    return {"cache_implementation": "static", "compile_config": config}


def use_cuda_graphs(model, device: str, requested: Optional[bool]) -> bool:
    """Whether to decode with :func:`graph_decode_kwargs`: ``requested`` if given, else on CUDA; never for a
    prompt-learning adapter (its virtual tokens live in a dynamic cache, which a static one replaces)."""
    from peftfast.config import PROMPT_LEARNING_CONFIGS
    from peftfast.patching import patch_state

    state = patch_state(model)
    if state is not None and any(isinstance(c, PROMPT_LEARNING_CONFIGS) for c in state.configs.values()):
        if requested:
            raise GenerateError("--cuda-graphs needs a static KV cache, which prompt-learning adapters (prefix, "
                                "prompt, p-tuning) cannot use: their virtual tokens live in the cache; drop the flag")
        return False
    if requested is None:
        return device == "cuda"
    if requested and device != "cuda":
        raise GenerateError("--cuda-graphs needs a CUDA GPU and none is available; drop the flag")
    return requested


@torch.no_grad()
def generate_ids(model, ids: list, max_new_tokens: int, eos_id: Optional[int], pad_id: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 decode_kwargs: Optional[dict] = None) -> list:
    """New token ids (up to and excluding EOS) from ``model.generate`` (``decode_kwargs``: e.g.
    :func:`graph_decode_kwargs`)."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    kwargs = dict(max_new_tokens=max_new_tokens, attention_mask=torch.ones_like(x), pad_token_id=pad_id,
                  eos_token_id=eos_id, **(decode_kwargs or {}))
    if temperature > 0:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    import warnings

    with warnings.catch_warnings():  # generate passes position ids, which prompt tuning ignores (as PEFT does)
        warnings.filterwarnings("ignore", message="position ids are ignored with prompt tuning")
        out = model.generate(x, **kwargs)[0, len(ids):].tolist()
    if eos_id is not None and eos_id in out:
        out = out[: out.index(eos_id)]
    return out


def run_generate(args) -> str:
    """Generate and print the continuation of ``--prompt``; returns it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise GenerateError("--temperature must be >= 0 and --top-p in (0, 1]")
    from .basemodel import bf16_by_default

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = bf16_by_default() if args.bf16 is None else args.bf16
    loaded = load_with_adapter(args.model, args.adapter, args.load_in_4bit, device,
                               torch.bfloat16 if bf16 else torch.float32)
    tok = loaded["tokenizer"]
    ids = encode_prompt(loaded, args.prompt, args.chat)
    graphs = use_cuda_graphs(loaded["model"], device, args.cuda_graphs)
    new = generate_ids(loaded["model"], ids, args.max_new_tokens, tok.eos_id, tok.pad_id,
                       args.temperature, args.top_p, args.seed, graph_decode_kwargs() if graphs else None)
    text = decode(loaded, new)
    print(text)
    return text


def main(argv: Optional[list] = None) -> str:
    p = argparse.ArgumentParser(prog="peftfast generate")
    add_arguments(p)
    return run_generate(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
