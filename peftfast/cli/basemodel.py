"""Base models for the command-line tools: the embedded tiny Llama, a local transformers directory, or a
Hugging Face Hub model id.

The embedded base is built from :func:`peftfast.cli.demo.tiny_llama_config` with a fixed seed, so
``peftfast train``, ``generate`` and ``merge`` rebuild the very same weights anywhere; adapters trained
on it record ``base_model_name_or_path = "peftfast:tiny-llama"`` and ``train_log.json`` keeps the
SHA-256 of its weights, which the other tools check.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Optional, Union

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


# A Hugging Face Hub repository id: "name" or "owner/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
EXAMPLE_ID = "meta-llama/Llama-3.2-1B"


class BaseModelError(ValueError):
    """A ``--model`` that names no loadable model (the message says why and what to pass instead)."""


def is_local(spec: str) -> bool:
    return Path(spec).expanduser().is_dir()


def check_model_spec(spec: Optional[str], flag: str = "--model") -> None:
    """Refuse, before anything is loaded, a ``--model`` that is neither a local directory nor a Hub id."""
    if spec is None or is_local(spec):
        return
    if Path(spec).expanduser().exists():
        raise BaseModelError(f"{flag} {spec}: a file, not a directory; give the directory that holds the model's "
                             f"config.json, or a Hugging Face Hub model id such as {EXAMPLE_ID}")
    if not _HUB_ID.match(spec):
        raise BaseModelError(f"{flag} {spec}: not a local directory, and not a Hugging Face Hub model id "
                             f"(owner/name, such as {EXAMPLE_ID})")


def hub_kwargs(spec: str) -> dict:
    """from_pretrained arguments: a local directory is read as is, never looked up on the Hub."""
    return {"local_files_only": True} if is_local(spec) else {}


def load_failure(spec: str, err: Exception, flag: str = "--model") -> BaseModelError:
    """A from_pretrained failure, said in terms of the flag (its first line carries transformers' reason)."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if is_local(spec):
        return BaseModelError(f"{flag} {spec}: cannot load it as a transformers causal LM ({reason}); it should "
                              "be a directory save_pretrained wrote (config.json, weights and tokenizer files)")
    return BaseModelError(f"{flag} {spec}: not a local directory, and not loadable from the Hugging Face Hub "
                          f"({reason}); check the id, run `hf auth login` for a gated model, or download it "
                          "first where the Hub can be reached (HF_HUB_OFFLINE=1 uses the local cache only)")


def bf16_by_default() -> bool:
    """Whether a command left without --bf16/--no-bf16 computes in bf16: on a CUDA GPU that has it (its
    tensor cores take bf16, and fp32 weights need twice the memory), not on a CPU, where PyTorch's bf16
    matmuls are emulated on many processors."""
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def load_base(model_dir: Optional[str], *, load_in_4bit: bool, device: str = "cpu",
              compute_dtype: Union[torch.dtype, str] = torch.float32) -> dict:
    """Load a base model and its tokenizer.

    Args:
        model_dir: a local transformers directory, a Hugging Face Hub model id (downloaded, or read from the
            Hub cache), or None for the embedded tiny Llama.
        load_in_4bit: quantize the base to NF4 (double-quantized absmax) with bitsandbytes.
        device: where the base is loaded (loaded there directly: a large base never sits on the CPU first).
        compute_dtype: the 4-bit base's compute dtype; a dense base's weights are loaded in it too (frozen
            weights in bf16 take half the memory; adapters stay fp32, see peftfast.layers.adapter_dtype).
            ``"auto"``: a dense base in the dtype its checkpoint was saved in, a 4-bit one computing in fp32.

    Returns:
        dict with ``model``, ``tokenizer`` (peftfast.cli.data.Tokenizer), ``hf_tokenizer`` (None for the
        embedded byte tokenizer), ``desc`` and ``fingerprint`` (embedded base only, else None).

    Raises:
        BaseModelError: ``model_dir`` names nothing loadable.
    """
    from transformers import AutoModelForCausalLM

    from .data import byte_tokenizer, hf_tokenizer

    kwargs = {"device_map": device}
    if load_in_4bit:
        kwargs["quantization_config"] = quant_config(torch.float32 if compute_dtype == "auto" else compute_dtype)
    else:
        kwargs["dtype"] = compute_dtype
    fp = None
    if model_dir is None:
        dense = build_embedded_base()
        fp = fingerprint(dense)
        with tempfile.TemporaryDirectory() as tmp:
            # Through a directory, so from_pretrained applies the dtype / 4-bit / device_map options. Not
            # save_pretrained: once a process group exists it writes on rank 0 only, and every rank of a
            # data-parallel run needs its own copy here. The embedded model ties no weights.
            from safetensors.torch import save_file

            dense.config.save_pretrained(tmp)
            tensors = {k: v.contiguous() for k, v in dense.state_dict().items()}
            save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            model = AutoModelForCausalLM.from_pretrained(tmp, local_files_only=True, **kwargs)
        model.config._name_or_path = EMBEDDED_NAME
        model.name_or_path = EMBEDDED_NAME
        tok, hf_tok, desc = byte_tokenizer(), None, "embedded tiny Llama (byte tokenizer)"
    else:
        from transformers import AutoTokenizer

        check_model_spec(model_dir)
        try:
            hf_tok = AutoTokenizer.from_pretrained(model_dir, **hub_kwargs(model_dir))
            model = AutoModelForCausalLM.from_pretrained(model_dir, **hub_kwargs(model_dir), **kwargs)
        except (OSError, ValueError) as e:
            raise load_failure(model_dir, e) from None
        tok = hf_tokenizer(hf_tok)
        desc = str(model_dir)
    if load_in_4bit:
        from ..layers.base_weight import keep_4bit_layout

        keep_4bit_layout(model)
        desc += ", base in NF4 (bitsandbytes)"
    elif isinstance(compute_dtype, torch.dtype) and compute_dtype != torch.float32:
        desc += f", base in {str(compute_dtype).replace('torch.', '')}"
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

    ``--model`` wins; otherwise the adapter's ``base_model_name_or_path`` (the embedded name, a local
    directory or a Hub model id). 4-bit: as asked, else as trained (``train_log.json`` method ``qlora``).
    """
    from ..config import CONFIG_NAME

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
    if is_local(base) or _HUB_ID.match(base):
        return base, load_in_4bit, log
    raise FileNotFoundError(f"the adapter's base model is {base!r}, which is neither a local directory here nor a "
                            "Hugging Face Hub model id; pass --model DIR_OR_ID")


def check_embedded(fp: Optional[str], log: dict) -> None:
    """Refuse an embedded base whose weights differ from the one the adapter was trained on."""
    want = log.get("base_sha256")
    if fp and want and fp != want:
        raise ValueError(
            "the embedded tiny Llama rebuilt here differs from the one this adapter was trained on (another "
            "transformers/torch version initializes it differently); retrain here, or train with --model DIR")
