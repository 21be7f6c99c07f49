"""Base models for the command-line tools: the embedded tiny Llama, or a local transformers directory.

The embedded base is built from :func:`peftfast.demo.tiny_llama_config` with a fixed seed, so
``peftfast train``, ``generate`` and ``merge`` rebuild the very same weights anywhere; adapters trained
on it record ``base_model_name_or_path = "peftfast:tiny-llama"`` and ``train_log.json`` keeps the
SHA-256 of its weights, which the other tools check.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Optional

import torch

EMBEDDED_NAME = "peftfast:tiny-llama"
EMBEDDED_SEED = 0


def build_embedded_base():
    """The embedded tiny Llama in fp32 (same weights on every call: the global RNG is left untouched)."""
    from transformers import LlamaForCausalLM

    from .demo import tiny_llama_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EMBEDDED_SEED)
        model = LlamaForCausalLM(tiny_llama_config())
    return model


def fingerprint(model) -> str:
    """SHA-256 of a dense model's state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def quant_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_base(model_dir: Optional[str], *, load_in_4bit: bool, device: str = "cpu",
              compute_dtype: torch.dtype = torch.float32) -> dict:
    """Load a base model and its tokenizer.

    Returns:
        dict with ``model``, ``tokenizer`` (peftfast.data.Tokenizer), ``hf_tokenizer`` (None for the
        embedded byte tokenizer), ``desc`` and ``fingerprint`` (embedded base only, else None).
    """
    from transformers import AutoModelForCausalLM

    from .data import byte_tokenizer, hf_tokenizer

    kwargs = {"local_files_only": True}
    if load_in_4bit:
        kwargs.update(quantization_config=quant_config(compute_dtype), device_map=device)
    else:
        kwargs["dtype"] = torch.float32
    fp = None
    if model_dir is None:
        dense = build_embedded_base()
        fp = fingerprint(dense)
        with tempfile.TemporaryDirectory() as tmp:
            dense.save_pretrained(tmp)
            model = AutoModelForCausalLM.from_pretrained(tmp, **kwargs)
        model.config._name_or_path = EMBEDDED_NAME
        model.name_or_path = EMBEDDED_NAME
        tok, hf_tok, desc = byte_tokenizer(), None, "embedded tiny Llama (byte tokenizer)"
    else:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        tok = hf_tokenizer(hf_tok)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        desc = str(model_dir)
    if load_in_4bit:
        desc += ", base in NF4 (bitsandbytes)"
    else:
        model.to(device)
    return {"model": model, "tokenizer": tok, "hf_tokenizer": hf_tok, "desc": desc, "fingerprint": fp}


def read_train_log(adapter_dir) -> dict:
    path = Path(adapter_dir) / "train_log.json"
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def resolve_base(model: Optional[str], adapter_dir, load_in_4bit: Optional[bool]) -> tuple:
    """Which base an adapter goes on: (model_dir or None for the embedded one, load_in_4bit, note).

    ``--model`` wins; otherwise the adapter's ``base_model_name_or_path`` (the embedded name, or a local
    directory). 4-bit: as asked, else as trained (``train_log.json`` method ``qlora``).
    """
    from .config import CONFIG_NAME

    cfg_path = Path(adapter_dir) / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {CONFIG_NAME}; not an adapter directory")
    with open(cfg_path, encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    log = read_train_log(adapter_dir)
    if load_in_4bit is None:
        load_in_4bit = log.get("method") == "qlora"
    if model is not None:
        return model, load_in_4bit, log
    if base in (None, "", EMBEDDED_NAME):
        return None, load_in_4bit, log
    if Path(base).is_dir():
        return base, load_in_4bit, log
    raise FileNotFoundError(
        f"the adapter's base model is {base!r}, which is not a local directory here; pass --model DIR")


def check_embedded(fp: Optional[str], log: dict) -> None:
    """Refuse an embedded base whose weights differ from the one the adapter was trained on."""
    want = log.get("base_sha256")
    if fp and want and fp != want:
        raise ValueError(
            "the embedded tiny Llama rebuilt here differs from the one this adapter was trained on (another "
            "transformers/torch version initializes it differently); retrain here, or train with --model DIR")
