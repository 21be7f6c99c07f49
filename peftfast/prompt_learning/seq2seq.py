"""Encoder-decoder models (``SEQ_2_SEQ_LM``), as PEFT's ``PeftModelForSeq2SeqLM``.

Prompt tuning: the first P of the 2P virtual tokens go before the encoder's input (PEFT trains and saves
2P, and uses P); the attention mask, which the decoder's cross-attention reuses, gets P ones in front.
The decoder is untouched. The encoder hook does the prepending, so generate() (which calls the encoder
itself) gets it too; the model hook extends the mask for the cross-attention.

Prefix tuning: exactly PEFT's cache: an EncoderDecoderCache whose self-attention part holds the prefix
(PEFT's layout: the [P, 2L*H*D] table doubled along the layer axis and cut in groups of four, so layer i
reads key/value rows 4i, 4i+1 modulo 2L) and whose cross-attention part starts empty (PEFT discards the
cross-attention prefix, since the encoder output changes). The encoder sees no prefix. A real cache
(these models compute attention themselves), so the reference path; not under gradient checkpointing.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from ..config import ConfigError, PrefixTuningConfig
from .call_args import as_kwargs, is_empty_cache, model_dtype, ones_before, pop_cache
from .encoders import PrefixEncoder, PromptLearning


def _seq2seq_batch(kw: dict) -> Optional[int]:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        if kw.get(key) is not None:
            return kw[key].shape[0]
    enc = kw.get("encoder_outputs")
    return enc[0].shape[0] if enc is not None else None


def _seq2seq_prefix_cache(cfg, encoder: PrefixEncoder, batch: int, dtype: Optional[torch.dtype]):
    from transformers import DynamicCache, EncoderDecoderCache

    emb = encoder.prompt_embeddings()
    if dtype is not None:
        emb = emb.to(dtype)
    p, heads = cfg.num_virtual_tokens, cfg.num_attention_heads
    kv = emb.unsqueeze(0).expand(batch, -1, -1).reshape(batch, p, cfg.num_layers * 2, heads, cfg.token_dim // heads)
    kv = torch.cat([kv, kv], dim=2).permute(2, 0, 3, 1, 4).split(4)
    cache = EncoderDecoderCache(kv)
    cache.cross_attention_cache = DynamicCache()
    for key in list(cache.is_updated.keys()):
        cache.is_updated[key] = False
    return cache


def seq2seq_hook(holder: PromptLearning, model: nn.Module, args: tuple, kwargs: dict):
    active = holder.active()
    if active is None:
        return None
    cfg, encoder = active
    kw = as_kwargs(model, args, kwargs)
    p = cfg.num_virtual_tokens
    if kw.get("position_ids") is not None:
        warnings.warn("position ids are ignored with prompt learning on encoder-decoder models (as in PEFT)")
        kw["position_ids"] = None
    if kw.get("token_type_ids") is not None:
        warnings.warn("token type ids are ignored with prompt learning on encoder-decoder models (as in PEFT)")
        kw["token_type_ids"] = None
    if isinstance(cfg, PrefixTuningConfig):
        cache, cache_key, _ = pop_cache(model, kw)
        kw[cache_key] = cache
        if cache is None or is_empty_cache(cache):
            batch = _seq2seq_batch(kw)
            if batch is None:
                raise ConfigError("the model was called without inputs (input_ids, inputs_embeds or decoder inputs)")
            kw[cache_key] = _seq2seq_prefix_cache(cfg, encoder, batch, model_dtype(model))
            dmask = kw.get("decoder_attention_mask")
            dec = kw.get("decoder_input_ids")
            if dec is None:
                dec = kw.get("decoder_inputs_embeds")
            if dmask is not None and dmask.dim() == 2 and (dec is None or dmask.shape[1] == dec.shape[1]):
                kw["decoder_attention_mask"] = ones_before(dmask, p)
        return (), kw
    mask = kw.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        enc = kw.get("encoder_outputs")
        if enc is None:
            x = kw.get("input_ids")
            if x is None:
                x = kw.get("inputs_embeds")
            n = x.shape[1] if x is not None else None
            if n is not None and mask.shape[1] == n:
                kw["attention_mask"] = ones_before(mask, p)
        elif enc[0].shape[1] == mask.shape[1] + p:  # encoder output computed with the virtual tokens (generate)
            kw["attention_mask"] = ones_before(mask, p)
    return (), kw


def encoder_prompt_hook(holder: PromptLearning, embeddings: nn.Module, encoder_module: nn.Module, args: tuple,
                         kwargs: dict):
    active = holder.active()
    if active is None:
        return None
    cfg, encoder = active
    kw = as_kwargs(encoder_module, args, kwargs)
    x = kw.get("inputs_embeds")
    if x is None:
        if kw.get("input_ids") is None:
            return None
        x = embeddings(kw["input_ids"])
    batch, n = x.shape[0], x.shape[1]
    p = cfg.num_virtual_tokens
    prompts = encoder.prompt_embeddings()[:p].to(x.dtype).unsqueeze(0).expand(batch, -1, -1)
    kw["inputs_embeds"] = torch.cat([prompts, x], dim=1)
    kw["input_ids"] = None
    mask = kw.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[1] == n:
        kw["attention_mask"] = ones_before(mask, p)
    return (), kw
