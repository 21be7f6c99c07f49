"""LoRA+ (Hayou et al., 2024, arXiv:2402.12354): an optimizer whose LoRA ``B`` matrices learn faster than ``A``.

:func:`create_loraplus_optimizer` groups a patched model's trainable parameters exactly as
``peft.optimizers.create_loraplus_optimizer`` does, so an optimizer built here for a peftfast model and
one built by PEFT for the same model patched by PEFT hold the same parameters, by name, in the same groups
with the same learning rates and weight decay:

* "A": everything not below (``lora_A``, prompt embeddings, ...): ``lr``, with weight decay;
* "embedding": every trainable parameter of a LoRA ``nn.Embedding`` layer (``lora_embedding_A`` *and*
  ``lora_embedding_B``, as in PEFT 0.21): ``loraplus_lr_embedding``, with weight decay;
* "B": ``lora_B`` and 1-D parameters (biases, DoRA magnitudes) that are neither inside a LayerNorm nor
  named ``bias``: ``lr * loraplus_lr_ratio``, with weight decay;
* "B, no decay": the other ``lora_B`` / 1-D parameters: ``lr * loraplus_lr_ratio``, no weight decay.

The four groups are always present, in that order (an empty group is kept), so that an optimizer state
saved by one run loads into the optimizer built by the next.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .config import ConfigError

#: bitsandbytes' 8-bit optimizers: embeddings are kept in 32-bit optimizer state under them, as PEFT does.
_EIGHT_BIT = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")
GROUPS = ("A", "embedding", "B", "B_no_decay")


def _check_rate(name: str, value, *, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        want = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ConfigError(f"{name} must be {want}, got {value!r}")
    return v


def _decayed_names(model: nn.Module) -> set:
    """Names of the parameters that take weight decay: those outside LayerNorm modules and without
    ``bias`` in their name (the rule of transformers' Trainer, which PEFT's LoRA+ follows)."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    return {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}


def _is_lora_embedding(model: nn.Module, param_name: str) -> bool:
    """Whether ``param_name`` belongs to a LoRA embedding layer: its adapter tensors sit in a
    ``ParameterDict`` right below the layer (``<layer>.lora_embedding_A.<adapter>``)."""
    from .layers.conv_embedding import LoraEmbedding

    owner = ".".join(param_name.split(".")[:-2])
    if not owner:
        return False
    try:
        return isinstance(model.get_submodule(owner), LoraEmbedding)
    except AttributeError:
        return False


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float, *,
                          loraplus_lr_embedding: float = 1e-6, weight_decay: float = 0.0) -> list:
    """The LoRA+ parameter groups of ``model`` (see the module docstring), for any ``torch.optim`` optimizer.

    Args:
        model: a model patched by :func:`peftfast.patch`; its parameters that require grad are grouped.
        lr: the learning rate of the ``A`` group.
        loraplus_lr_ratio: ``lr_B / lr_A`` (the paper suggests 2-16; > 0).
        loraplus_lr_embedding: the learning rate of LoRA embedding layers (PEFT's default 1e-6).
        weight_decay: the decay of every group but "B, no decay".

    Returns:
        A list of four dicts with ``params``, ``lr``, ``weight_decay`` and ``names`` (the parameters' names,
        for inspection; pop it before handing the groups to an optimizer that refuses unknown keys).

    Raises:
        ValueError: a rate that is not a finite positive number (ratio <= 0, NaN, ...), or a model with no
            trainable parameter.
    """
    lr = _check_rate("lr", lr)
    ratio = _check_rate("loraplus_lr_ratio", loraplus_lr_ratio)
    lr_embedding = _check_rate("loraplus_lr_embedding", loraplus_lr_embedding, allow_zero=True)
    weight_decay = _check_rate("weight_decay", weight_decay, allow_zero=True)
    decayed = _decayed_names(model)
    grouped: dict = {g: {} for g in GROUPS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _is_lora_embedding(model, name):
            grouped["embedding"][name] = p
        elif "lora_B" in name or p.ndim == 1:
            grouped["B" if name in decayed else "B_no_decay"][name] = p
        else:
            grouped["A"][name] = p
    if not any(grouped.values()):
        raise ConfigError("the model has no trainable parameters; patch it with peftfast.patch(model, config) first")
    settings = {"A": (lr, weight_decay), "embedding": (lr_embedding, weight_decay),
                "B": (lr * ratio, weight_decay), "B_no_decay": (lr * ratio, 0.0)}
    return [{"params": list(grouped[g].values()), "names": list(grouped[g]), "lr": settings[g][0],
             "weight_decay": settings[g][1]} for g in GROUPS]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type, *, lr: float, loraplus_lr_ratio: float,
                              loraplus_lr_embedding: float = 1e-6, weight_decay: Optional[float] = None,
                              loraplus_weight_decay: Optional[float] = None, **kwargs) -> torch.optim.Optimizer:
    """An optimizer with LoRA+ learning rates: ``lora_B`` at ``lr * loraplus_lr_ratio``, the rest at ``lr``.

    The parameter groups are those of ``peft.optimizers.create_loraplus_optimizer`` (see the module
    docstring); code written for PEFT's function runs unchanged. One difference: PEFT silently drops a
    ``weight_decay=`` argument (each group sets its own, from ``loraplus_weight_decay``); here
    ``weight_decay`` and ``loraplus_weight_decay`` are the same setting, and giving both differently is an error.

    Args:
        model: a model patched by :func:`peftfast.patch`.
        optimizer_cls: e.g. ``torch.optim.AdamW`` (or a bitsandbytes 8-bit optimizer: LoRA embedding layers
            then keep 32-bit optimizer state, as with PEFT).
        lr: the base learning rate (the ``A`` matrices').
        loraplus_lr_ratio: ``lr_B / lr_A``, > 0 (the paper uses 2-16; PEFT's docs suggest >= 1).
        loraplus_lr_embedding: the learning rate of LoRA on ``nn.Embedding`` layers (default 1e-6, as PEFT).
        weight_decay / loraplus_weight_decay: the decay of all groups but biases and LayerNorm parameters
            (default 0).
        **kwargs: passed to ``optimizer_cls`` (``betas``, ``eps``, ...).

    Returns:
        ``optimizer_cls`` over the four LoRA+ groups.

    Raises:
        ValueError: a rate that is not a finite positive number, or no trainable parameter.

    Example:
        >>> opt = peftfast.create_loraplus_optimizer(  # doctest: +SKIP
        ...     model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)
    """
    if weight_decay is not None and loraplus_weight_decay is not None and weight_decay != loraplus_weight_decay:
        raise ConfigError(f"weight_decay={weight_decay} and loraplus_weight_decay={loraplus_weight_decay} name the same "
                         "setting; pass one of them")
    decay = next((v for v in (weight_decay, loraplus_weight_decay) if v is not None), 0.0)
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding=loraplus_lr_embedding,
                                   weight_decay=decay)
    for g in groups:
        g.pop("names")
    optimizer = optimizer_cls(groups, lr=float(lr), **kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT:
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


__all__ = ["create_loraplus_optimizer", "loraplus_param_groups"]
