"""The attention function that adds the prefix: ``peftfast_prefix_sdpa`` / ``peftfast_prefix_eager``.

Registered with transformers' ``AttentionInterface`` and switched on in the model's config, it sees the real
K/V plus the prefix (:class:`~.cache.PrefixKV`, passed down by the forward hook as a keyword argument): on
CUDA it calls the fused ``kernels.prefix_attention`` (the prefix is never concatenated or expanded over the
batch); elsewhere it concatenates and runs the wrapped SDPA / eager function, like PEFT.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .cache import PrefixKV
from .model_config import text_config

# Registered names are ATTN_PREFIX + the wrapped implementation, one of SUPPORTED_ATTENTION.
ATTN_PREFIX = "peftfast_prefix_"
SUPPORTED_ATTENTION = ("sdpa", "eager")
# The keyword argument that carries the PrefixKV from the model's forward down to the attention function.
PREFIX_KWARG = "peftfast_prefix"


def _wrapped_attention(module):
    """The implementation the prefix wraps: transformers' SDPA, or the model file's own eager function."""
    name = module.config._attn_implementation
    if name == ATTN_PREFIX + "eager":
        import sys

        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        return fn, "eager"
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward, "sdpa"


def prefix_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers attention function: the wrapped implementation plus the per-layer prefix.

    query [B, Hq, Nq, D]; key/value [B, Hkv, Nk, D] (real tokens only); attention_mask [B, 1, Nq, P+Nk]
    (built by the model for a cache that reports P past tokens) or None. Returns ([B, Nq, Hq, D], weights).
    """
    wrapped, kind = _wrapped_attention(module)
    prefix = kwargs.pop(PREFIX_KWARG, None)
    if prefix is None:  # adapters disabled, or a forward that did not come through the model's hook
        return wrapped(module, query, key, value, attention_mask, *args, **kwargs)
    pk, pv = prefix.layer(module.layer_idx)
    pk, pv = pk.to(key.dtype), pv.to(value.dtype)
    if not kwargs.get("output_attentions"):
        out = _fused_prefix_attention(module, query, key, value, pk, pv, attention_mask, prefix, kwargs)
        if out is not None:
            return out, None
    b, nq, nk = query.shape[0], query.shape[2], key.shape[2]
    k_all = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), key], dim=2)
    v_all = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), value], dim=2)
    if attention_mask is None and nq > 1 and getattr(module, "is_causal", True):
        # SDPA's is_causal aligns top-left; with the prefix the diagonal sits P + Nk - Nq to the right.
        i = torch.arange(nq, device=query.device).view(-1, 1)
        j = torch.arange(prefix.prefix_len + nk, device=query.device).view(1, -1)
        visible = (j <= i + prefix.prefix_len + nk - nq).view(1, 1, nq, -1).expand(b, 1, nq, -1)
        if kind == "eager":
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            attention_mask = torch.where(visible, zero, torch.finfo(query.dtype).min)
        else:
            attention_mask = visible
    return wrapped(module, query, k_all, v_all, attention_mask, *args, **kwargs)


def _fused_prefix_attention(module, query, key, value, pk, pv, mask, prefix: PrefixKV, kwargs):
    """The Triton kernel when it applies (else None): a plain causal+padding mask, no attention dropout,
    no sliding window, no soft-capping."""
    from ..kernels.dispatch import resolve_backend

    if resolve_backend(prefix.backend, query.device) != "triton" or not prefix.mask_is_2d:
        return None
    try:
        from ..kernels import prefix_attention
    except ImportError:
        return None
    if (module.training and kwargs.get("dropout", 0.0)) or kwargs.get("sliding_window") or kwargs.get("softcap"):
        return None
    p = prefix.prefix_len
    nk = key.shape[2]
    padding = None
    if mask is not None:
        if mask.dim() != 4 or mask.shape[-1] != p + nk:
            return None
        last = mask[:, 0, -1, p:]  # the last query sees every real key that is not padding
        padding = last if last.dtype == torch.bool else last == 0
    causal = bool(getattr(module, "is_causal", True))
    out = prefix_attention(query, key, value, pk, pv, causal=causal, attention_mask=padding,
                           scale=kwargs.get("scaling"), backend=prefix.backend)
    return out.transpose(1, 2).contiguous()


def register_attention(original: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = ATTN_PREFIX + original
    AttentionInterface.register(name, prefix_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def set_attention(model: nn.Module, name: str) -> list:
    """Point every config of the model at ``name``; returns the undo steps."""
    undo = []
    seen = set()
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "_attn_implementation_internal"):
            continue
        seen.add(id(cfg))
        before = cfg._attn_implementation_internal
        cfg._attn_implementation_internal = name
        undo.append(lambda c=cfg, b=before: setattr(c, "_attn_implementation_internal", b))
    return undo


def prefix_attention_problem(model: nn.Module) -> Optional[str]:
    """Why prefix tuning cannot run on this model's attention (None when it can)."""
    original = getattr(text_config(model), "_attn_implementation", None)
    if original not in SUPPORTED_ATTENTION:
        return (
            f"prefix tuning runs on the model's attention interface with attn_implementation='sdpa'; this model "
            f"uses {original!r}. Load it with attn_implementation='sdpa' (or call model.set_attn_implementation"
            "('sdpa')) before patching"
        )
    return None
