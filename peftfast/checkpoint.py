"""Adapters on disk in Hugging Face PEFT's format, both ways.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata
``{"format": "pt"}``); keys are the model's parameter names under ``base_model.model.`` with the adapter
name removed: ``...q_proj.lora_A.weight``, ``...q_proj.lora_magnitude_vector``, ``...k_proj.ia3_l``, and a
``modules_to_save`` copy under its plain module path (``base_model.model.score.weight``).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Optional

import torch
import torch.nn as nn

from .checkpoint_keys import (
    PREFIX, PROMPT_KEY, PROMPT_LEARNING_PREFIX, is_adapter_key, is_modules_to_save_key, model_key, modules_to_save_tag,
    peft_key,
)
from .config import CONFIG_NAME, PROMPT_LEARNING_CONFIGS, ConfigError, as_config, load_config_file
from .layers import AdapterLayer, ModulesToSave
from .patching import _apply_trainable, _patch, _require_state, patch_state
from .prompt_learning import prompt_learning_of

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
# The sentence every README.md that save_adapter writes holds: only such a README is ever replaced.
MODEL_CARD_TAG = "Saved by peftfast in Hugging Face PEFT's format"


class AdapterLoadError(ValueError):
    """An adapter directory that does not fit the model; the message names the key and the fix."""


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict:
    """The adapter's tensors under PEFT's checkpoint keys.

    Example:
        >>> sd = adapter_state_dict(model)  # doctest: +SKIP
    """
    state = _require_state(model)
    if adapter_name not in state.configs:
        raise ConfigError(f"no adapter named {adapter_name!r}; this model has {sorted(state.configs)}")
    cfg = state.configs[adapter_name]
    holder = prompt_learning_of(model)
    if holder is not None and adapter_name in holder.encoders:
        # PEFT saves the virtual tokens' final values (after any prefix MLP) under one plain key, and the
        # modules_to_save (classification heads) under ``base_model.<module path>``: for prompt learning its
        # ``base_model`` is the transformers model itself, without LoRA's ``.model``.
        out = {PROMPT_KEY: holder.encoders[adapter_name].prompt_embeddings().detach()}
        for key, value in model.state_dict(keep_vars=True).items():
            if is_modules_to_save_key(key, adapter_name):
                out[PROMPT_LEARNING_PREFIX + key.replace(modules_to_save_tag(adapter_name), "")] = value.detach()
        return out
    out = {}
    # A module reachable at two paths (weight tying, a layer placed twice) puts the same Parameter under
    # both names in state_dict(). PEFT finds its layers through named_modules(), which visits each module
    # once, so its file holds such a tensor once, under the first path; load_adapter fills the other paths.
    emitted: set = set()
    for key, value in model.state_dict(keep_vars=True).items():
        saved = peft_key(key, adapter_name)  # an adapter tensor (peftfast.checkpoint_keys), or None
        if saved is None and getattr(cfg, "bias", "none") != "none" and (key == "bias" or key.endswith(".bias")) \
                and _bias_is_saved(model, key, cfg):
            # bias="all" / "lora_only": base biases under their own names. PEFT's rule: a parameter named "bias"
            # (not MultiheadAttention's in_proj_bias)
            saved = key
            if cfg.bias == "all" and id(value) in emitted:
                # PEFT takes bias="all" from the whole state_dict, every path included, and clones the
                # aliases (safetensors refuses tensors that share memory).
                out[PREFIX + saved] = value.detach().clone()
                continue
        if saved is not None:
            if id(value) in emitted:
                continue
            emitted.add(id(value))
            out[PREFIX + saved] = value.detach()
    out.update(_embedding_base_weights(model, state.target_names.get(adapter_name, [])))
    return out


def _embedding_base_weights(model: nn.Module, targets: list) -> dict:
    """PEFT also saves the *base* weights of a targeted embed_tokens / lm_head (for resized vocabularies);
    we write the same keys so the files match."""
    if not any(re.match(r"(.*\.)?(embed_tokens|lm_head)$", n) for n in targets):
        return {}
    wanted = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        layer = getattr(model, getter, lambda: None)()
        base = getattr(layer, "base_layer", None)
        if isinstance(layer, AdapterLayer) and isinstance(base, (nn.Linear, nn.Embedding)):
            wanted.append(base)
    prefixes = [f"{name}." for name, module in model.named_modules() if any(module is b for b in wanted)]
    return {PREFIX + k: v.detach() for k, v in model.state_dict(keep_vars=True).items() if k.startswith(tuple(prefixes))}


def _bias_is_saved(model: nn.Module, key: str, cfg) -> bool:
    if ".modules_to_save." in key or ".original_module." in key:
        return False
    if cfg.bias == "all":
        return True
    owner = key.rsplit(".", 2)[0] if key.count(".") >= 2 else ""
    return key.endswith("base_layer.bias") and isinstance(model.get_submodule(owner), AdapterLayer)


def _config_for_save(model: nn.Module, adapter_name: str) -> dict:
    state = patch_state(model)
    cfg = state.configs[adapter_name]
    data = cfg.to_dict()
    if isinstance(data.get("target_modules"), str) and data["target_modules"].lower() == "all-linear":
        data["target_modules"] = list(state.target_names[adapter_name])  # PEFT saves the expansion too
    data["inference_mode"] = True
    if not data.get("base_model_name_or_path"):
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
        data["base_model_name_or_path"] = name or None
    return data


def _model_card(config: dict) -> str:
    base = config.get("base_model_name_or_path") or ""
    method = str(config.get("peft_type", "")).lower()
    return (
        f"---\nbase_model: '{base}'\nlibrary_name: peft\ntags:\n- {method}\n- peftfast\n---\n\n"
        f"# {method.upper()} adapter\n\n{MODEL_CARD_TAG}: load it with "
        "`peft.PeftModel.from_pretrained(base, path)` or `peftfast.load_adapter(base, path)`.\n"
    )


def _is_our_model_card(path: str) -> bool:
    """Whether ``path`` is a README.md that :func:`save_adapter` wrote (and may therefore replace)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MODEL_CARD_TAG in f.read(4096)
    except OSError:
        return False


def save_adapter(model: nn.Module, path: str, *, adapter_name: str = "default",
                 path_initial_model_for_weight_conversion: Optional[str] = None) -> None:
    """Write the adapter in PEFT's format, atomically.

    The new directory is written whole beside ``path``, fsynced and swapped in with one rename (see
    :func:`peftfast.fileio.staged_directory`), so a save killed at any point leaves the old adapter or the
    new one, never a config of one with the weights of the other. Other files in an existing directory (a
    training run's log and checkpoints) are kept, and so is a README.md that peftfast did not write.

    Args:
        model: a patched model.
        path: the adapter directory (not empty; created if missing).
        adapter_name: which adapter to save.
        path_initial_model_for_weight_conversion: PEFT's option of that name: the directory where this
            PiSSA/OLoRA adapter was saved right after ``patch``, before training. The adapter is then written as
            a plain LoRA adapter of rank 2r (``lora_A`` = [A; A0], ``lora_B`` = [B, -B0], alpha scaled to keep
            the scaling, ``init_lora_weights`` true) that applies to the *original* base, so it loads anywhere
            with no change to the base (see :func:`peftfast.lora_init.convert_to_lora`). Unlike PEFT, that
            directory is only read, never rewritten.

    Raises:
        ValueError: an empty ``path`` (it would write into the current directory).
        FileExistsError: ``path`` is a file.

    Example:
        >>> peftfast.save_adapter(model, "out/adapter")  # doctest: +SKIP
    """
    from safetensors.torch import save_file

    from .fileio import staged_directory

    path = os.fspath(path)
    if not str(path).strip():
        raise ConfigError("save_adapter: the path is empty; give the adapter directory to write, e.g. 'out/adapter' "
                         "(use '.' to mean the current directory)")
    tensors = adapter_state_dict(model, adapter_name)
    _check_saveable(tensors, adapter_name)
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    config = _config_for_save(model, adapter_name)
    if path_initial_model_for_weight_conversion is not None:
        from .lora_init import convert_to_lora

        initial = os.fspath(path_initial_model_for_weight_conversion)
        tensors, config = convert_to_lora(tensors, config, read_adapter_weights(initial), initial)
    path = os.path.abspath(path)
    keep_readme = os.path.isfile(os.path.join(path, "README.md")) and not _is_our_model_card(
        os.path.join(path, "README.md"))
    with staged_directory(path) as tmp:
        save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        if not keep_readme:
            with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
                f.write(_model_card(config))


def _check_saveable(tensors: dict, adapter_name: str) -> None:
    """Refuse adapters that would save as garbage: on the meta device (no values), or holding NaN/Inf."""
    meta = sorted(k for k, v in tensors.items() if v.is_meta)
    if meta:
        raise ConfigError(f"adapter {adapter_name!r} has tensors on the meta device (no values), e.g. {meta[:2]}; "
                         "materialize the model (model.to_empty(device=...) and load its weights) before saving")
    warn_non_finite(tensors, f"adapter {adapter_name!r} being saved")


def warn_non_finite(tensors: dict, what: str) -> list:
    """Warn (once, naming the tensors) when any floating tensor of ``tensors`` holds NaN or Inf.

    Returns:
        The names of the non-finite tensors.
    """
    bad = sorted(k for k, v in tensors.items()
                 if v.is_floating_point() and not v.is_meta and not bool(torch.isfinite(v).all()))
    if bad:
        warnings.warn(f"{what}: {len(bad)} tensors hold NaN or Inf, e.g. {bad[:3]}; the adapter's outputs will be "
                      "NaN (fp16 overflow or a diverged run?)", RuntimeWarning, stacklevel=3)
    return bad


def read_adapter_weights(path: str) -> dict:
    """Load an adapter's tensors: safetensors, or a legacy ``.bin`` (weights only) when no safetensors exists.

    Raises:
        FileNotFoundError: neither file exists.
        AdapterLoadError: the file is truncated, not safetensors, or a ``.bin`` that holds pickled objects.
    """
    from safetensors.torch import load_file

    st = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(st):
        try:
            return load_file(st)
        except Exception as e:  # safetensors' own error type (a truncated or foreign file) has no path
            raise AdapterLoadError(f"{st} is not a readable safetensors file ({e}); it is truncated or damaged: "
                                   "save the adapter again, or copy it again from where it came from") from None
    legacy = os.path.join(path, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(legacy):
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:
            # torch's message suggests weights_only=False, i.e. running the file's code: never here.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AdapterLoadError(
                f"{legacy}: refused. peftfast reads .bin adapters only as plain tensors (torch.load with "
                f"weights_only=True), never by unpickling arbitrary objects, which can run code; this file "
                f"holds more than tensors or is damaged ({first}). Convert it to {WEIGHTS_NAME} where you trust it"
            ) from None
    raise FileNotFoundError(
        f"{path} has no {WEIGHTS_NAME} (nor {LEGACY_WEIGHTS_NAME}); an adapter directory holds {CONFIG_NAME} "
        f"and {WEIGHTS_NAME}. Found: {sorted(os.listdir(path)) if os.path.isdir(path) else 'no such directory'}"
    )


def load_adapter(
    model: nn.Module,
    path: str,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    backend: str = "auto",
) -> nn.Module:
    """Load a PEFT-format adapter (saved by peft or peftfast) into ``model`` in place.

    Args:
        model: the base model (or one already carrying other adapters of the same method).
        path: the adapter directory.
        adapter_name: the name to give it.
        is_trainable: keep its parameters trainable; otherwise they are frozen (inference).
        backend: as for :func:`patch`.

    Returns:
        The same model. The adapter becomes active if it is the model's first; otherwise use
        :func:`set_adapter`. On any error the model is left exactly as it was.

    Example:
        >>> peftfast.load_adapter(base, "hf-peft-adapter/")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    config = as_config(load_config_file(path))
    weights = read_adapter_weights(path)
    warn_non_finite(weights, path)
    _warn_other_base(model, config, path)
    on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise AdapterLoadError(
            f"{path}: the model is on the meta device (no storage), so the adapter's values cannot be loaded "
            f"into it (e.g. {on_meta[:2]}); materialize the model first (load its weights, or "
            "model.to_empty(device=...) and load them), then load the adapter"
        )
    if isinstance(config, PROMPT_LEARNING_CONFIGS):
        return _load_prompt_learning(model, path, config, weights, adapter_name, is_trainable, backend)
    config.inference_mode = not is_trainable
    rollback = _patch(model, config, adapter_name, backend)
    try:
        save_wrappers = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
        params = model.state_dict(keep_vars=True)
        expected = {k for k in params if is_adapter_key(k, adapter_name)}
        mapped = {}
        for saved_key, tensor in weights.items():
            key = model_key(saved_key, adapter_name, save_wrappers)
            if key not in params:
                raise AdapterLoadError(
                    f"{path}: key {saved_key!r} does not match any parameter of this model (looked for {key!r}); "
                    "was the adapter trained on another architecture or with other target_modules?"
                )
            if tuple(params[key].shape) != tuple(tensor.shape):
                raise AdapterLoadError(
                    f"{path}: {saved_key!r} has shape {tuple(tensor.shape)} but the model's {key!r} is "
                    f"{tuple(params[key].shape)}; the adapter was made for a different base model or rank"
                )
            mapped[key] = tensor
        # A path that aliases a loaded tensor (the same module reachable twice) is filled by that load.
        loaded = {id(params[k]) for k in mapped}
        missing = sorted(k for k in expected - set(mapped) if id(params[k]) not in loaded)
        if missing:
            raise AdapterLoadError(
                f"{path}: {len(missing)} adapter tensors are missing from {WEIGHTS_NAME}, e.g. {missing[:3]}; "
                "the file is incomplete or belongs to another config"
            )
        with torch.no_grad():
            for key, tensor in mapped.items():
                params[key].copy_(tensor.to(params[key].dtype))
        if not is_trainable:
            for key in expected:
                params[key].requires_grad_(False)
    except BaseException:
        rollback()
        raise
    return model


def _base_name(name: str) -> str:
    """A model's name for comparison: a Hub id or a local folder (a Hub cache snapshot reads as its id)."""
    name = str(name).rstrip("/\\")
    m = re.search(r"models--([^/\\]+)--([^/\\]+)", name)
    if m:
        return m.group(2).lower()
    return re.split(r"[/\\]", name)[-1].lower()


def _warn_other_base(model: nn.Module, config, path: str) -> None:
    """Warn when the adapter names a base model other than the one it is loaded into (PEFT trusts the
    caller here too, but a mismatch is almost always a mistake: shapes may even fit and the output is wrong)."""
    wanted = getattr(config, "base_model_name_or_path", None)
    have = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not wanted or not have or not isinstance(have, str) or _base_name(wanted) == _base_name(have):
        return
    warnings.warn(f"{path} was made for base model {wanted!r}, but it is being loaded into {have!r}; if that is not "
                  "the same model, the adapter's outputs are meaningless", UserWarning, stacklevel=3)


def _load_prompt_learning(model, path, config, weights, adapter_name, is_trainable, backend):
    # Built in inference mode: the saved tensor *is* the prefix/prompt (any prefix MLP already applied),
    # so it loads into a plain embedding, which stays trainable when asked (PEFT cannot train it then).
    config.inference_mode = True
    rollback = _patch(model, config, adapter_name, backend)
    try:
        save_wrappers = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
        params = model.state_dict(keep_vars=True)
        expected = {k for k in params if modules_to_save_tag(adapter_name) in k}
        heads = {}
        for saved_key in sorted(set(weights) - {PROMPT_KEY}):
            key = saved_key[len(PROMPT_LEARNING_PREFIX):] if saved_key.startswith(PROMPT_LEARNING_PREFIX) else None
            key = model_key(key, adapter_name, save_wrappers) if key is not None else None
            if key not in expected:
                raise AdapterLoadError(
                    f"{path}: a {config.peft_type} adapter holds {PROMPT_KEY!r} and the modules_to_save copies "
                    f"({PROMPT_LEARNING_PREFIX}<module>.*); {saved_key!r} matches neither on this model. The file "
                    "belongs to another kind of adapter or another architecture"
                )
            if tuple(params[key].shape) != tuple(weights[saved_key].shape):
                raise AdapterLoadError(
                    f"{path}: {saved_key!r} has shape {tuple(weights[saved_key].shape)} but the model's {key!r} is "
                    f"{tuple(params[key].shape)}; the adapter was made for a different base model"
                )
            heads[key] = weights[saved_key]
        if PROMPT_KEY not in weights:
            raise AdapterLoadError(
                f"{path}: a {config.peft_type} adapter holds {PROMPT_KEY!r}; found {sorted(weights)}. The file "
                "belongs to another kind of adapter"
            )
        missing = sorted(expected - set(heads))
        if missing:
            raise AdapterLoadError(
                f"{path}: {len(missing)} modules_to_save tensors are missing from {WEIGHTS_NAME}, e.g. {missing[:3]}; "
                "the file is incomplete or belongs to another config"
            )
        embedding = prompt_learning_of(model).encoders[adapter_name].embedding.weight
        tensor = weights[PROMPT_KEY]
        if tuple(tensor.shape) != tuple(embedding.shape):
            raise AdapterLoadError(
                f"{path}: {PROMPT_KEY!r} has shape {tuple(tensor.shape)} but this model needs {tuple(embedding.shape)} "
                f"(num_virtual_tokens x layers x 2 x kv_heads x head_dim for prefix tuning); the adapter was made for "
                "a different base model"
            )
        with torch.no_grad():
            embedding.copy_(tensor.to(embedding.dtype))
            for key, value in heads.items():
                params[key].copy_(value.to(params[key].dtype))
        if is_trainable:
            config.inference_mode = False
        _apply_trainable(model, patch_state(model))
        if not is_trainable:
            embedding.requires_grad_(False)
            for key in expected:
                params[key].requires_grad_(False)
    except BaseException:
        rollback()
        raise
    return model

