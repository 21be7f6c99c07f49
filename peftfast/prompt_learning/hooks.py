"""The forward pre-hooks of decoder-only and encoder models: prefix tuning and prompt tuning / P-tuning.

Prompt tuning prepends ``P`` learned embeddings to ``inputs_embeds`` (attention mask extended with ones,
labels with -100). Prefix tuning is wired by one mechanism for every family using transformers' attention
interface (Llama, Qwen2, Mistral, GPT-2, OPT, ...):

1. The hook on the top-level model computes the prefix *once per forward* from the encoder
   (``[layers][Hkv, P, D]``, no batch dimension), and passes it down as a keyword argument: transformers
   forwards extra keyword arguments to the attention function, also under gradient checkpointing, so nothing
   is cached on modules between steps (FSDP/ZeRO swap storage freely).
2. It gives the model a prefix cache (:mod:`.cache`) that *reports* ``P`` extra past tokens, so the model
   computes positions and the mask exactly as with PEFT's cache.
3. The model's attention implementation, switched when the adapter was added (:mod:`.attach`), is
   ``peftfast_prefix_sdpa`` (:mod:`.attention`), which adds the prefix to the real K/V.

Models that compute attention themselves (Bloom, GPT-J, GPT-Neo) get the prefix through the cache instead.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from .attention import PREFIX_KWARG
from .cache import PrefixKV, prefix_cache_class
from ..config import ConfigError
from .call_args import as_kwargs, batch_and_length, is_empty_cache, model_dtype, ones_before, pop_cache
from .encoders import prompt_learning_of
from .model_config import CLASSIFICATION_TASKS, uses_attention_interface


def _active_call(model: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
    """(holder, config, encoder, the call's keyword arguments, batch, length) of a forward while an adapter is
    active; None when adapters are off or none is active (the hook then leaves the call alone)."""
    holder = prompt_learning_of(model)
    active = holder.active() if holder is not None else None
    if active is None:
        return None
    cfg, encoder = active
    kw = as_kwargs(model, args, kwargs)
    batch, n = batch_and_length(kw)
    return holder, cfg, encoder, kw, batch, n


def prefix_hook(model: nn.Module, args: tuple, kwargs: dict):
    call = _active_call(model, args, kwargs)
    if call is None:
        return None
    holder, cfg, encoder, kw, batch, n = call
    p = cfg.num_virtual_tokens
    cache_cls = prefix_cache_class()
    cache, cache_key, given = pop_cache(model, kw)
    if cache is None or (not isinstance(cache, cache_cls) and is_empty_cache(cache)):
        cache = cache_cls(p, cfg.num_layers)
    elif not isinstance(cache, cache_cls):
        raise ConfigError(
            f"{given} holds tokens computed without the prefix; with prefix tuning pass no cache (or an empty "
            "one) and let the model build its own"
        )
    real = cache.real_length()
    kw[cache_key] = cache
    mask = kw.get("attention_mask")
    mask_is_2d = mask is None or mask.dim() == 2
    if mask is not None and mask.dim() == 2 and mask.shape[1] == real + n:
        kw["attention_mask"] = ones_before(mask, p)
    # generate() counts real tokens only, other callers may already count the prefix: the model recounts
    # from its cache, which reports the P virtual tokens, so both agree without reading the tensor back.
    kw.pop("cache_position", None)
    if kw.get("position_ids") is not None:
        kw["position_ids"] = kw["position_ids"] + p  # PEFT shifts explicit positions past the prefix
    embeddings = encoder.prompt_embeddings()
    dtype = model_dtype(model)
    if dtype is not None:
        embeddings = embeddings.to(dtype)
    prefix = PrefixKV(embeddings, cfg.num_layers, cfg.num_attention_heads, holder.backend, mask_is_2d)
    if uses_attention_interface(model):
        kw[PREFIX_KWARG] = prefix
        return (), kw
    if model.training and getattr(model, "is_gradient_checkpointing", False):
        raise ConfigError(
            f"{type(model).__name__} computes attention itself, so the prefix reaches it only through the KV cache, "
            "which gradient checkpointing drops; disable gradient checkpointing for prefix tuning on this model "
            "(as PEFT requires), or use a model on transformers' attention interface"
        )
    cache.set_prefix(prefix)
    return (), kw


def prompt_hook(model: nn.Module, args: tuple, kwargs: dict):
    call = _active_call(model, args, kwargs)
    if call is None:
        return None
    holder, cfg, encoder, kw, batch, n = call
    p = cfg.num_virtual_tokens * cfg.num_transformer_submodules
    cache, cache_key, _ = pop_cache(model, kw)
    kw[cache_key] = cache
    prefill = cache is None or is_empty_cache(cache)
    if kw.get("position_ids") is not None:
        warnings.warn("position ids are ignored with prompt tuning (as in PEFT); the model numbers the virtual tokens too")
        kw["position_ids"] = None
    classification = cfg.task_type in CLASSIFICATION_TASKS
    token_types = kw.get("token_type_ids")
    if token_types is not None and classification:
        if prefill:  # PEFT gives the virtual tokens type 0 (classification models keep token types)
            kw["token_type_ids"] = torch.cat([token_types.new_zeros(batch, p), token_types], dim=1)
    elif token_types is not None:
        warnings.warn("token type ids are ignored with prompt tuning (as in PEFT)")
        kw["token_type_ids"] = None
    kw.pop("cache_position", None)  # the model recounts from its cache, which includes the virtual tokens
    mask = kw.get("attention_mask")
    past = 0 if prefill else cache.get_seq_length() - p
    if mask is not None and mask.dim() == 2 and mask.shape[1] == past + n:
        kw["attention_mask"] = ones_before(mask, p)
    if not prefill:
        return (), kw
    embeds = kw.get("inputs_embeds")
    if embeds is None:
        embeds = model.get_input_embeddings()(kw["input_ids"])
    prompts = encoder.prompt_embeddings().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    kw["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)
    kw["input_ids"] = None
    labels = kw.get("labels")
    if labels is not None and not classification:  # language modelling: no loss on the virtual tokens
        kw["labels"] = torch.cat([torch.full((batch, p), -100, dtype=labels.dtype, device=labels.device), labels], dim=1)
    return (), kw
