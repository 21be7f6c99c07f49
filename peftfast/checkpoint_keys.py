"""The one table of how peftfast's parameter names map onto the keys of Hugging Face PEFT's checkpoints.

A wrapper layer keeps each adapter's tensors in a dict attribute keyed by adapter name (PEFT's attribute
names), so a model's state-dict key is ``<module path>.<attr>.<adapter>[.<tensor>]``. PEFT saves it under
``base_model.model.<module path>.<attr>[.<tensor>]`` without the adapter name, except where the table below
says otherwise (DoRA's magnitude drops its ``.weight``; trainable tokens sit under PEFT's ``token_adapter``).
Save (:func:`peft_key`), load (:func:`model_key`), reading a checkpoint's keys (:func:`saved_param`, e.g. the
PiSSA/OLoRA conversion), the check of which tensors a loaded file must hold (:func:`is_adapter_key`) and the
wrappers' own bookkeeping (``AdapterLayer.adapter_param_names`` must name rows of :data:`ADAPTER_PARAMS`) all
read this table; nothing else spells these forms out.

Example:
    >>> peft_key("model.layers.0.self_attn.q_proj.lora_A.default.weight", "default")
    'model.layers.0.self_attn.q_proj.lora_A.weight'
    >>> model_key("model.layers.0.self_attn.q_proj.lora_A.weight", "default")
    'model.layers.0.self_attn.q_proj.lora_A.default.weight'
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, Optional

# Every key of a LoRA / IA3 checkpoint starts with this (PEFT's PeftModel.base_model is a tuner whose
# .model is the transformers model).
PREFIX = "base_model.model."
# Prompt learning's checkpoint: the virtual tokens under one plain key, and modules_to_save copies under
# "base_model." + their module path (for prompt learning PEFT's base_model is the transformers model itself).
PROMPT_KEY = "prompt_embeddings"
PROMPT_LEARNING_PREFIX = "base_model."

# The trainable-token rows' attribute on peftfast's TrainableTokensLayer.
TOKENS_PARAM = "trainable_tokens_delta"


@dataclass(frozen=True)
class AdapterParam:
    """One adapter tensor kind: where peftfast keeps it and how PEFT names it.

    ``model`` and ``saved`` are the key after ``<module path>.``: ``{adapter}`` stands for the adapter name,
    ``{tensor}`` for the tensor of a module held per adapter (``weight``, ``bias``).
    """

    attr: str
    model: str
    saved: str
    what: str

    def to_saved(self, key: str, adapter: str) -> Optional[str]:
        """``key`` (a model state-dict key) under PEFT's name, or None when it is not this kind's."""
        m = _form_regex(self.model, adapter).match(key)
        return None if m is None else f"{m['path']}.{self.saved.format(tensor=m.groupdict().get('tensor'))}"

    def to_model(self, key: str, adapter: str) -> Optional[str]:
        """``key`` (a PEFT key without :data:`PREFIX`) under peftfast's name, or None when not this kind's."""
        m = _form_regex(self.saved, None).match(key)
        if m is None:
            return None
        return f"{m['path']}.{self.model.format(adapter=adapter, tensor=m.groupdict().get('tensor'))}"


@functools.lru_cache(maxsize=512)
def _form_regex(form: str, adapter: Optional[str]) -> "re.Pattern":
    """A whole-key pattern for ``<module path>.<form>``; ``adapter`` None leaves no adapter slot (saved forms)."""
    parts = re.split(r"(\{adapter\}|\{tensor\})", form)
    body = "".join(
        re.escape(adapter) if p == "{adapter}" else r"(?P<tensor>.+)" if p == "{tensor}" else re.escape(p)
        for p in parts
    )
    # The module path is the shortest that fits, so the first occurrence of the attribute in a key decides,
    # as a plain substring search would.
    return re.compile(r"(?P<path>.+?)\." + body + r"\Z")


# The table. Order matters for load only where one saved form could end another's (none do today);
# rows are tried top to bottom.
ADAPTER_PARAMS = (
    AdapterParam("lora_A", "lora_A.{adapter}.{tensor}", "lora_A.{tensor}",
                 "LoRA down-projection (an nn.Linear / nn.ConvNd per adapter)"),
    AdapterParam("lora_B", "lora_B.{adapter}.{tensor}", "lora_B.{tensor}",
                 "LoRA up-projection; its bias is lora_bias"),
    AdapterParam("lora_magnitude_vector", "lora_magnitude_vector.{adapter}.weight", "lora_magnitude_vector",
                 "DoRA magnitude (a module holding .weight; PEFT saves the vector under the attribute name)"),
    AdapterParam("lora_embedding_A", "lora_embedding_A.{adapter}", "lora_embedding_A",
                 "LoRA on nn.Embedding, A (a Parameter per adapter)"),
    AdapterParam("lora_embedding_B", "lora_embedding_B.{adapter}", "lora_embedding_B",
                 "LoRA on nn.Embedding, B"),
    AdapterParam("ia3_l", "ia3_l.{adapter}", "ia3_l", "IA3 scaling vector (a Parameter per adapter)"),
    AdapterParam(TOKENS_PARAM, TOKENS_PARAM + ".{adapter}", "token_adapter." + TOKENS_PARAM,
                 "trainable_token_indices rows (PEFT's wrapper keeps the layer as token_adapter)"),
)
BY_ATTR = {p.attr: p for p in ADAPTER_PARAMS}

# modules_to_save: a full copy of a module per adapter. The model holds ``<path>.modules_to_save.<adapter>.<rest>``
# (peftfast's ModulesToSave, as PEFT's), the checkpoint ``<path>.<rest>``; on load, the wrapper paths of the
# model tell where the adapter name goes back in.
MODULES_TO_SAVE_ATTR = "modules_to_save"


def modules_to_save_tag(adapter: str) -> str:
    """The part of a state-dict key that marks an adapter's modules_to_save copy."""
    return f"{MODULES_TO_SAVE_ATTR}.{adapter}."


def is_modules_to_save_key(key: str, adapter: str) -> bool:
    """Whether ``key`` is a tensor of ``adapter``'s modules_to_save copy."""
    tag = modules_to_save_tag(adapter)
    return f".{tag}" in key or key.startswith(tag)


def adapter_param(key: str, adapter: str) -> Optional[AdapterParam]:
    """The table row whose tensor ``key`` (a model state-dict key) is, for ``adapter``; None if none."""
    return next((p for p in ADAPTER_PARAMS if p.to_saved(key, adapter) is not None), None)


def peft_key(key: str, adapter: str) -> Optional[str]:
    """PEFT's checkpoint key (without :data:`PREFIX`) of model state-dict key ``key`` when it is one of
    ``adapter``'s tensors (a table row or a modules_to_save copy); None otherwise.

    Example:
        >>> peft_key("score.modules_to_save.default.weight", "default")
        'score.weight'
    """
    for p in ADAPTER_PARAMS:
        saved = p.to_saved(key, adapter)
        if saved is not None:
            return saved
    if is_modules_to_save_key(key, adapter):
        return key.replace(modules_to_save_tag(adapter), "")
    return None


def saved_param(saved: str) -> Optional[tuple]:
    """The table row of checkpoint key ``saved`` (with or without :data:`PREFIX`) and its tensor part.

    Returns:
        ``(row, tensor)``: ``tensor`` is ``"weight"`` / ``"bias"`` for rows holding a module per adapter, else
        None; or None when ``saved`` is no row's (a modules_to_save copy, a base bias or weight).

    Example:
        >>> row, tensor = saved_param("base_model.model.q_proj.lora_B.bias")
        >>> row.attr, tensor
        ('lora_B', 'bias')
    """
    key = saved[len(PREFIX):] if saved.startswith(PREFIX) else saved
    for p in ADAPTER_PARAMS:
        m = _form_regex(p.saved, None).match(key)
        if m is not None:
            return p, m.groupdict().get("tensor")
    return None


def model_key(saved: str, adapter: str, save_wrappers: Iterable[str] = ()) -> str:
    """The model state-dict key a checkpoint key loads into (the inverse of :func:`peft_key`).

    Args:
        saved: the checkpoint key, with or without :data:`PREFIX`.
        adapter: the adapter name to load it as.
        save_wrappers: module paths of the model's ModulesToSave wrappers.

    Returns:
        The key; an unmatched one comes back as it is (without the prefix), for the caller to report.
    """
    key = saved[len(PREFIX):] if saved.startswith(PREFIX) else saved
    for p in ADAPTER_PARAMS:
        mapped = p.to_model(key, adapter)
        if mapped is not None:
            return mapped
    for wrapper in save_wrappers:
        if key.startswith(wrapper + "."):
            return f"{wrapper}.{modules_to_save_tag(adapter)}{key[len(wrapper) + 1:]}"
    return key


def is_adapter_key(key: str, adapter: str) -> bool:
    """Whether model state-dict key ``key`` is one of ``adapter``'s tensors (what its checkpoint must hold)."""
    return adapter_param(key, adapter) is not None or is_modules_to_save_key(key, adapter)


def check_param_names(owner: str, names: Iterable[str]) -> None:
    """Raise TypeError unless every name is a row of the table (a wrapper class's ``adapter_param_names``):
    a tensor kind missing here would be silently left out of saved checkpoints."""
    unknown = [n for n in names if n not in BY_ATTR]
    if unknown:
        raise TypeError(f"{owner}.adapter_param_names holds {unknown}, which peftfast.checkpoint_keys.ADAPTER_PARAMS "
                        "does not list; add a row saying how PEFT names them in its checkpoints")
