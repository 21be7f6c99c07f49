"""``peftfast merge``: fold a LoRA/DoRA/IA3 adapter into its base and save a plain transformers model.

The result loads with ``AutoModelForCausalLM.from_pretrained(OUT)`` and needs neither peftfast nor PEFT.
A 4-bit (QLoRA) base is *not* requantized (``peftfast.unpatch(model, merge_adapters=True)`` on a 4-bit
model would requantize the merged weight, losing the adapter's update to NF4 rounding): one layer at a
time, each NF4 layer is dequantized to fp32, the adapter is merged in fp32 and the result is cast to
``--dtype`` (bf16 by default for 4-bit bases), so the model computes what the 4-bit base plus adapter
computed, up to that rounding, and no more than one layer is ever held in fp32. A dense base merged into
its own dtype (``--dtype auto``) is loaded in that dtype, not fp32.
Prefix and prompt tuning add virtual tokens, not weight updates: they cannot be merged.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..fileio import staged_directory

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class MergeError(ValueError):
    """An adapter that cannot be merged, or an output in the way."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="the base model: local transformers directory or Hub id (default: the "
                   "adapter's base_model_name_or_path; the embedded tiny Llama for `peftfast train` adapters)")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    p.add_argument("--output", required=True, help="where to save the merged model (save_pretrained)")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="dtype of the saved weights (auto: bf16 for a 4-bit base, else the base's own dtype)")
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="the adapter was trained on an NF4 base (default: as recorded in its train_log.json)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --output directory")


def _dense_copy(m: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` holding a bitsandbytes ``Linear4bit``'s dequantized weight (and bias) in ``dtype``."""
    from ..layers.base_weight import dense_base_weight

    w = dense_base_weight(m, torch.float32).to(dtype)
    dense = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(w)
        if m.bias is not None:
            dense.bias.copy_(m.bias.to(dtype))
    return dense


def _is_4bit_linear(m: nn.Module) -> bool:
    from ..layers.base_weight import _bnb_classes

    linear4bit = _bnb_classes()[0]
    return bool(linear4bit) and isinstance(m, linear4bit)


def dequantize_4bit_layers(model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Replace every bitsandbytes ``Linear4bit`` (also those inside adapter wrappers) by an ``nn.Linear``
    holding its dequantized weight; returns how many were replaced."""
    todo = [(name, m) for name, m in model.named_modules() if _is_4bit_linear(m)]
    for name, m in todo:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, _dense_copy(m, dtype))
    if todo:
        _forget_quantization(model)
    return len(todo)


def merge_4bit_layer_by_layer(model: nn.Module, dtype: torch.dtype) -> int:
    """Merge the active adapters into a 4-bit base one layer at a time, leaving plain ``dtype`` weights.

    Each adapted layer is dequantized to fp32, merged in fp32 and cast to ``dtype`` before the next one, so
    at most one layer is ever held in fp32 (dequantizing the whole model first would hold all of them:
    32 GB for an 8B model, where its bf16 result is 16 GB). The other 4-bit layers are dequantized
    straight to ``dtype``. Returns how many 4-bit layers were replaced.
    """
    from ..layers import AdapterLayer

    wrapped = [m for m in model.modules() if isinstance(m, AdapterLayer) and _is_4bit_linear(m.base_layer)]
    for layer in wrapped:
        layer.base_layer = _dense_copy(layer.base_layer, torch.float32)
        layer.merge()
        layer.base_layer.to(dtype)
    rest = dequantize_4bit_layers(model, dtype)
    if wrapped:
        _forget_quantization(model)
    return len(wrapped) + rest


def _forget_quantization(model: nn.Module) -> None:
    """Make a dequantized transformers model save (and reload) as a plain one."""
    cfg = getattr(model, "config", None)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if cfg is not None and hasattr(cfg, attr):
            delattr(cfg, attr)
    for attr, value in (("hf_quantizer", None), ("is_quantized", False), ("is_loaded_in_4bit", False),
                        ("is_loaded_in_8bit", False), ("quantization_method", None)):
        if attr in model.__dict__:
            model.__dict__[attr] = value


def merged_model(model_dir: Optional[str], adapter: str, load_in_4bit: Optional[bool], dtype: str = "auto") -> dict:
    """Load base + adapter and merge; returns the load_with_adapter dict with ``model`` merged and cast."""
    import peftfast

    from ..config import CONFIG_NAME
    from .generate import GenerateError, load_with_adapter

    cfg_path = Path(adapter) / CONFIG_NAME
    if not cfg_path.is_file():
        raise MergeError(f"--adapter {adapter}: no {CONFIG_NAME}; not an adapter directory")
    with open(cfg_path, encoding="utf-8") as f:
        peft_type = str(json.load(f).get("peft_type", "")).upper()
    if peft_type in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
        raise MergeError(f"{adapter} is a {peft_type} adapter: it adds virtual tokens, not weight updates, so it "
                         "cannot be merged into the base; load it with peftfast.load_adapter (or peftfast generate)")
    # A dense base merged into its own dtype loads in it ("auto"): LoRA/IA3/DoRA merges add the update in
    # fp32 and round once to the weight's dtype, so the result is bit for bit that of an fp32 load cast at
    # the end, at half the memory for a bf16 checkpoint. Another --dtype loads fp32 and rounds once at the end.
    try:
        loaded = load_with_adapter(model_dir, adapter, load_in_4bit, "cpu",
                                   "auto" if dtype == "auto" else torch.float32)
    except GenerateError as e:
        raise MergeError(str(e)) from None
    model = loaded["model"]
    four_bit = any(_is_4bit_linear(m) for m in model.modules())
    if dtype == "auto":
        # A dense base was loaded in its checkpoint's dtype (transformers' "auto"); model.dtype is that of
        # its first weights, the embeddings (the adapters, fp32, come later).
        target = torch.bfloat16 if four_bit else model.dtype
    else:
        target = DTYPES[dtype]
    if four_bit:
        merge_4bit_layer_by_layer(model, target)
    peftfast.unpatch(model, merge_adapters=True)  # merges what is left (a dense base), then unwraps
    model.to(target)
    model.config.dtype = target
    loaded["dtype"], loaded["was_4bit"] = target, four_bit
    return loaded


def run_merge(args) -> str:
    """Merge and ``save_pretrained`` into ``--output`` (atomically); returns the output path."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    out = Path(args.output)
    _check_output(out, args)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise MergeError(f"--output {out} exists and is not an empty directory; pass --overwrite to replace it")
    loaded = merged_model(args.model, args.adapter, args.load_in_4bit, args.dtype)
    # --overwrite replaces what save_pretrained writes (an older merge's weight shards and index included);
    # every other file in the folder stays.
    with staged_directory(out, drop=_is_model_weights) as tmp:
        loaded["model"].save_pretrained(tmp)
        if loaded["hf_tokenizer"] is not None:
            loaded["hf_tokenizer"].save_pretrained(tmp)
    kind = "4-bit base dequantized, " if loaded["was_4bit"] else ""
    print(f"merged {args.adapter} into {loaded['desc']} ({kind}saved in {str(loaded['dtype']).replace('torch.', '')}) "
          f"-> {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    if loaded["hf_tokenizer"] is None:
        print("note: the embedded model's tokenizer is UTF-8 bytes (BOS/EOS/PAD = 256); no tokenizer files written")
    return str(out)


_WEIGHT_FILE = re.compile(r"^(model|pytorch_model|tf_model|flax_model)(-\d+-of-\d+)?\.(safetensors|bin|h5|msgpack)"
                          r"(\.index\.json)?$")


def _is_model_weights(name: str) -> bool:
    return bool(_WEIGHT_FILE.match(name))


def _check_output(out: Path, args) -> None:
    """Refuse an --output that is, or holds, one of the command's inputs: writing it would replace the adapter
    (or the base) being merged."""
    target = out.resolve()
    for flag, value in (("--adapter", args.adapter), ("--model", args.model)):
        if value is None or not Path(value).exists():
            continue
        source = Path(value).resolve()
        if target == source or source.is_relative_to(target):
            raise MergeError(f"--output {out} {'is' if target == source else 'holds'} the {flag} "
                             f"directory {value}; writing there would replace the files being merged. Choose an "
                             "--output outside it")


def main(argv: Optional[list] = None) -> str:
    p = argparse.ArgumentParser(prog="peftfast merge")
    add_arguments(p)
    return run_merge(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
