"""What prompt learning reads from the model's config, and the checks on it: PEFT's
``_prepare_prompt_learning_config`` in our words.

Task types: ``CAUSAL_LM``, ``SEQ_CLS`` and ``TOKEN_CLS`` (prefix tuning only: prompt tuning would give the
virtual tokens labels too), whose heads train as ``modules_to_save`` (see peftfast.patching), and
``SEQ_2_SEQ_LM`` on encoder-decoder models (see :mod:`.seq2seq`). Classification prompt tuning keeps
``token_type_ids`` (type 0 for the virtual tokens) and leaves the labels alone, as PEFT does.
"""
from __future__ import annotations

import torch.nn as nn

from ..config import ConfigError, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

# Configs whose virtual tokens are embeddings placed before the input (prompt tuning and P-tuning).
PROMPT_CONFIGS = (PromptTuningConfig, PromptEncoderConfig)
# Task types whose forward semantics peftfast reproduces (PEFT's PeftModelForCausalLM, ...ForSequenceClassification
# and ...ForTokenClassification); the classification ones also train their head (modules_to_save).
SUPPORTED_TASKS = (None, "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM")
CLASSIFICATION_TASKS = ("SEQ_CLS", "TOKEN_CLS")


def text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ConfigError("prompt learning needs a transformers model (one with a .config)")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _first(cfg, names: tuple):
    for n in names:
        value = getattr(cfg, n, None)
        if value is not None:
            return value
    return None


def complete_config(cfg, model: nn.Module) -> None:
    """Fill num_layers, token_dim, num_attention_heads (KV heads for prefix tuning, as PEFT does for
    grouped-query attention) and num_transformer_submodules from the model's config."""
    mc = text_config(model)
    seq2seq = is_seq2seq(model)
    if seq2seq and cfg.task_type != "SEQ_2_SEQ_LM":
        raise ConfigError(
            f"{type(cfg).__name__} on an encoder-decoder model needs task_type='SEQ_2_SEQ_LM' (got "
            f"{cfg.task_type!r}); other task types on encoder-decoder models are not supported by peftfast yet"
        )
    if not seq2seq and cfg.task_type == "SEQ_2_SEQ_LM":
        raise ConfigError(
            f"task_type='SEQ_2_SEQ_LM' needs an encoder-decoder model (T5, BART, ...); this is "
            f"{type(model).__name__}: use task_type='CAUSAL_LM'"
        )
    if cfg.task_type not in SUPPORTED_TASKS:
        raise ConfigError(
            f"{type(cfg).__name__} with task_type={cfg.task_type!r} is not supported by peftfast yet; "
            f"use one of {[t for t in SUPPORTED_TASKS if t]}"
        )
    if cfg.task_type == "TOKEN_CLS" and isinstance(cfg, PROMPT_CONFIGS):
        raise ConfigError(
            f"{type(cfg).__name__} with task_type='TOKEN_CLS' is not supported: the classifier would label the virtual "
            "tokens too and the labels no longer line up (Hugging Face PEFT fails on it as well); use "
            "PrefixTuningConfig, which adds no tokens"
        )
    layers = _first(mc, ("num_hidden_layers", "num_layers", "n_layer"))
    hidden = _first(mc, ("hidden_size", "n_embd", "d_model"))
    heads = _first(mc, ("num_attention_heads", "n_head", "num_heads"))
    if None in (layers, hidden, heads):
        raise ConfigError("could not read the layer count, hidden size and head count from the model config")
    token_dim = hidden
    if isinstance(cfg, PrefixTuningConfig):
        # Grouped-query attention: the prefix is sized by the KV heads (as PEFT does since #1901).
        kv_heads = getattr(mc, "num_key_value_heads", None)
        if kv_heads is not None:
            head_dim = getattr(mc, "head_dim", None) or hidden // heads
            token_dim, heads = head_dim * kv_heads, kv_heads
    wanted = {"num_layers": layers, "token_dim": token_dim, "num_attention_heads": heads}
    if isinstance(cfg, PROMPT_CONFIGS):
        wanted.pop("num_attention_heads")  # unused by prompt tuning
    wrong = [f"{k}={getattr(cfg, k)} (the model needs {v})" for k, v in wanted.items()
             if getattr(cfg, k) is not None and getattr(cfg, k) != v]
    if wrong:
        raise ConfigError(
            f"{type(cfg).__name__} was made for another model: {', '.join(wrong)}; use an adapter trained on this "
            "base model, or leave these fields unset to size a new adapter from the model"
        )
    cfg.num_layers, cfg.token_dim = layers, token_dim
    if cfg.num_attention_heads is None:
        cfg.num_attention_heads = heads
    if cfg.num_transformer_submodules is None:
        cfg.num_transformer_submodules = 2 if cfg.task_type == "SEQ_2_SEQ_LM" else 1
    if isinstance(cfg, (PrefixTuningConfig, PromptEncoderConfig)) and cfg.encoder_hidden_size is None:
        cfg.encoder_hidden_size = cfg.token_dim


def is_seq2seq(model: nn.Module) -> bool:
    """An encoder-decoder model (T5, BART, ...): prompt learning goes through its encoder / its cache."""
    return bool(getattr(text_config(model), "is_encoder_decoder", False)) and hasattr(model, "get_encoder")


def uses_attention_interface(model: nn.Module) -> bool:
    """Whether the model's attention layers call transformers' attention interface (so the prefix can
    travel as an argument to the fused kernel). Others (Bloom, GPT-J, GPT-Neo) compute attention
    themselves and get the prefix concatenated by the cache, as PEFT does (reference path)."""
    return bool(getattr(model, "_supports_attention_backend", False))
