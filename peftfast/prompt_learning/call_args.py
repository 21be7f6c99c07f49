"""Reading and rewriting the arguments of a model's forward call, for the forward pre-hooks.

Hooks see ``(args, kwargs)`` as the caller passed them; these helpers turn them into one keyword dict, find the
KV cache under whichever name the transformers version uses, and extend 2-D attention masks.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn as nn

from ..config import ConfigError


def as_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    if not args:
        return dict(kwargs)
    names = [
        n for n, p in inspect.signature(model.forward).parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    out = dict(zip(names, args))
    out.update(kwargs)
    return out


# The forward argument that carries the KV cache: ``past_key_values`` up to transformers 5.23, ``cache`` from 5.24
# (which still takes ``past_key_values`` with a deprecation warning, but drops it when ``cache`` is given too, as
# generate() does). The hooks read either and write back the name the model's forward declares.
CACHE_KWARGS = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _declared_cache_kwarg(model_cls: type) -> Optional[str]:
    params = inspect.signature(model_cls.forward).parameters
    return next((key for key in CACHE_KWARGS if key in params), None)


def _cache_kwarg(model: nn.Module) -> str:
    """The name ``model``'s forward takes its KV cache by. Classification heads (BertForSequenceClassification)
    often declare neither and pass ``**kwargs`` on to their backbone, whose forward then decides."""
    for module in (model, getattr(model, "base_model", None)):
        if isinstance(module, nn.Module):
            key = _declared_cache_kwarg(type(module))
            if key is not None:
                return key
    return "past_key_values"


def pop_cache(model: nn.Module, kw: dict) -> tuple:
    """Take the caller's cache out of ``kw``, under either name.

    Returns:
        (the cache or None, the name the model's forward takes it by, the name the caller used (for errors)).

    Example:
        >>> cache, key, _ = pop_cache(model, kw)
        >>> kw[key] = cache
    """
    declared = _cache_kwarg(model)
    found, given = None, declared
    for key in CACHE_KWARGS:  # "cache" first: transformers prefers it when both are given
        value = kw.pop(key, None)
        if found is None and value is not None:
            found, given = value, key
    return found, declared, given


def batch_and_length(kw: dict) -> tuple:
    x = kw.get("input_ids")
    if x is None:
        x = kw.get("inputs_embeds")
    if x is None:
        raise ConfigError("the model was called with neither input_ids nor inputs_embeds")
    return x.shape[0], x.shape[1]


def ones_before(mask: torch.Tensor, p: int) -> torch.Tensor:
    return torch.cat([torch.ones(mask.shape[0], p, dtype=mask.dtype, device=mask.device), mask], dim=1)


def is_empty_cache(cache) -> bool:
    try:
        return cache.get_seq_length() == 0
    except Exception:  # pragma: no cover - an unknown cache type
        return False


def model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
