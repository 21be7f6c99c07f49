"""Which modules an adapter config targets, by PEFT's matching rules.

- a string ``target_modules`` is a regex that must match the whole module name;
- a list matches a name exactly or as a dotted suffix (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``);
- ``"all-linear"``: every linear layer except the output embedding (and, for SEQ_CLS, the head);
- ``exclude_modules`` uses the same forms and wins; modules under ``modules_to_save`` are never targets;
- ``layers_to_transform`` keeps only layers whose index (read after ``layers_pattern``, or after the
  first ``<name>.<index>.`` in the module path) is listed.
"""
from __future__ import annotations

import re
from typing import Optional

import torch.nn as nn

from .config import SEQ_CLS_HEADS, ConfigError

ALL_LINEAR = "all-linear"

# Each family's default targets when a config gives none (the same defaults Hugging Face PEFT uses).
DEFAULT_LORA_TARGETS = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "xlm-roberta": ["query", "value"], "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"], "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "falcon": ["query_key_value"], "stablelm": ["q_proj", "v_proj"],
}
DEFAULT_IA3_TARGETS = {
    "t5": (["k", "v", "wo"], ["wo"]), "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]), "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]), "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
}


def model_type(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def name_matches(spec, name: str) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches exactly or as a dotted suffix."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + t) for t in spec)


def layer_index(name: str, layers_pattern) -> Optional[int]:
    if layers_pattern:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        for pattern in patterns:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m:
                return int(m.group("idx"))
        return None
    m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    return int(m.group("idx")) if m else None


def under_modules_to_save(name: str, modules_to_save) -> bool:
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save or [])


def output_head_names(model: nn.Module, task_type: Optional[str]) -> set:
    """Linear layers "all-linear" leaves alone: the LM head, or the classification head."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None and task_type == "SEQ_CLS":
        for attr in SEQ_CLS_HEADS:
            head = getattr(model, attr, None)
            if head is not None:
                break
    if head is not None:
        names.update(n for n, m in model.named_modules() if m is head)
    return names


def resolve_targets(model: nn.Module, config, is_supported, *, allow_empty: bool = False) -> list:
    """Names of the modules ``config`` targets, in model order.

    Args:
        model: the model to patch.
        config: a LoraConfig or IA3Config (``target_modules``, ``exclude_modules``, ...).
        is_supported: predicate on a module; targets of other types raise.
        allow_empty: return [] instead of raising when nothing matches (LoRA with ``target_parameters``,
            which may adapt parameters only).

    Returns:
        The matched module names.

    Raises:
        ConfigError: nothing matched (the message lists names that exist), or a matched module is of
            a type no wrapper supports.
    """
    from .layers import AdapterLayer

    targets = config.target_modules
    if targets is None:
        family = model_type(model)
        table = DEFAULT_LORA_TARGETS if config.peft_type == "LORA" else {k: v[0] for k, v in DEFAULT_IA3_TARGETS.items()}
        if family not in table and allow_empty:
            return []
        if family not in table:
            raise ConfigError(
                f"target_modules is not set and peftfast has no default for model type {family!r}; "
                "set target_modules (a list of module names, a regex, or 'all-linear')"
            )
        targets = table[family]
    modules_to_save = config.effective_modules_to_save()
    skip_inside = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    heads = output_head_names(model, config.task_type) if all_linear else set()
    chosen = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in skip_inside):
            continue
        if under_modules_to_save(name, modules_to_save):
            continue
        if name_matches(config.exclude_modules, name):
            continue
        if all_linear:
            from .layers import is_linear_like

            hit = (is_linear_like(module) or isinstance(module, AdapterLayer)) and name not in heads
        else:
            hit = name_matches(targets, name)
            layers = getattr(config, "layers_to_transform", None)
            if hit and layers is not None and not isinstance(targets, str):
                idx = layer_index(name, config.layers_pattern)
                wanted = layers
                wanted = [wanted] if isinstance(wanted, int) else wanted
                hit = idx is not None and idx in wanted
        if hit:
            if not (is_supported(module) or isinstance(module, AdapterLayer)):
                raise ConfigError(
                    f"module {name!r} matches target_modules but is a {type(module).__name__}; peftfast "
                    "wraps nn.Linear, transformers Conv1D and bitsandbytes Linear4bit/Linear8bitLt (LoRA also nn.Embedding "
                    "and nn.Conv1d/Conv2d/Conv3d, IA3 also nn.Conv2d/Conv3d, as PEFT). "
                    "Narrow target_modules (or add it to exclude_modules)"
                )
            chosen.append(name)
    if not chosen and allow_empty:
        return []
    layers = getattr(config, "layers_to_transform", None)
    if not chosen and layers is not None and not isinstance(targets, str):
        by_name = [n for n, _ in model.named_modules() if n and name_matches(targets, n)]
        if by_name:
            found = sorted({i for i in (layer_index(n, config.layers_pattern) for n in by_name) if i is not None})
            raise ConfigError(
                f"target_modules={targets!r} matches {len(by_name)} modules, but none in layers_to_transform="
                f"{layers!r}; the layer indices here are {found if found else 'not found (set layers_pattern)'}"
            )
    if not chosen:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_supported(m)})
        raise ConfigError(
            f"target_modules={targets!r} matched no module of this {type(model).__name__}; linear layers "
            f"here are named {leaf_names}"
        )
    return chosen
