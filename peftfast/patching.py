"""Putting adapters into a model in place, and the operations on a patched model.

``patch`` is a transaction: every wrapper is built and checked before the first one is installed, and
any failure undoes what was done, so a failed call leaves the model exactly as it was (same module
objects, same state dict, same ``requires_grad`` flags).
"""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Callable, Iterator, Optional, Union

import torch.nn as nn

from .config import PROMPT_LEARNING_CONFIGS, AnyConfig, ConfigError, IA3Config, LoraConfig, as_config
from .kernels.dispatch import check_backend
from .layers import AdapterLayer, IA3Layer, LoraLayer, ModulesToSave, is_linear_like
from .layers.ia3_conv import IA3Conv, is_ia3_extra
from .layers.conv_embedding import CONV_TYPES, LoraConv, LoraEmbedding, is_lora_extra
from .lora_init import forget_base, is_base_init, restore_base
from .layers.mha import LoraMultiheadAttention, bare_out_projections
from .layers.params import build_parameter_wrappers, warn_unmatched
from .prompt_learning import PromptLearning, add_prompt_learning, remove_prompt_learning
from .layers.trainable_tokens import TrainableTokensLayer
from .targets import DEFAULT_IA3_TARGETS, model_type, name_matches, resolve_targets



class PatchState:
    """What peftfast knows about a patched model, kept on it as ``model.peftfast_state``."""

    def __init__(self) -> None:
        self.configs: dict = {}
        self.active: list = []
        self.target_names: dict = {}  # adapter -> names of wrapped modules
        self.original_requires_grad: dict = {}  # parameter name -> flag before the first patch


def patch_state(model: nn.Module) -> Optional[PatchState]:
    return model.__dict__.get("peftfast_state")


def _require_state(model: nn.Module) -> PatchState:
    state = patch_state(model)
    if state is None or not state.configs:
        raise ConfigError("this model has no peftfast adapters; call peftfast.patch(model, config) first")
    return state


def _parent(model: nn.Module, name: str):
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _pattern_value(patterns: dict, name: str, default):
    if not patterns:
        return default
    if name in patterns:
        return patterns[name]
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _warn_unused_patterns(cfg: LoraConfig, targets: list) -> None:
    """PEFT applies a rank_pattern / alpha_pattern key to the targets it matches; a key that matches none
    is almost always a typo, and the adapter then trains with the default rank or alpha."""
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(cfg, field) or {}
        unused = [key for key in patterns
                  if not any(name == key or re.match(rf"(.*\.)?({key})$", name) for name in targets)]
        if unused:
            default = "r" if field == "rank_pattern" else "lora_alpha"
            warnings.warn(f"{field} keys {unused} match none of the {len(targets)} target modules (e.g. "
                          f"{targets[:3]}); those entries have no effect and every target uses {default}. Fix "
                          "the keys (regexes matched at the end of a module name) or remove them",
                          UserWarning, stacklevel=4)


def _modules_to_save_names(model: nn.Module, config) -> list:
    wanted = config.effective_modules_to_save()
    names = []
    for name, module in model.named_modules():
        if not name or isinstance(module, AdapterLayer):
            continue
        if any(name == w or name.endswith("." + w) for w in wanted):
            if any(name.startswith(n + ".") for n in names):
                continue
            names.append(name)
    # PEFT writes both common head names ("classifier", "score") into every classification adapter and
    # ignores the one a model lacks; only a list of which nothing matches is surely a mistake.
    explicit = list(config.modules_to_save or [])
    missing = [w for w in explicit if not any(n == w or n.endswith("." + w) for n in names) and not _already_saved(model, w)]
    if explicit and len(missing) == len(explicit):
        raise ConfigError(f"modules_to_save names {missing}, but the model has no module of those names")
    return names


def _already_saved(model: nn.Module, short: str) -> bool:
    return any(isinstance(m, ModulesToSave) and (n == short or n.endswith("." + short)) for n, m in model.named_modules())


def patch(
    model: nn.Module,
    config: Union[AnyConfig, dict, str, object],
    *,
    adapter_name: str = "default",
    backend: str = "auto",
) -> nn.Module:
    """Add an adapter to ``model`` in place.

    Args:
        model: a transformers (or any torch) model; bitsandbytes 4-/8-bit bases are supported.
        config: a peftfast or ``peft`` LoraConfig / IA3Config, a dict, or a path to adapter_config.json.
        adapter_name: name of the new adapter; several can live side by side.
        backend: "auto" (Triton on CUDA, reference elsewhere), "triton" or "reference".

    Returns:
        The same model object. The first adapter becomes active and only its parameters (plus
        ``modules_to_save``) require grad; a later adapter is added inactive, as in PEFT: use
        :func:`set_adapter` to switch.

    Example:
        >>> peftfast.patch(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))  # doctest: +SKIP
    """
    _patch(model, config, adapter_name, backend)
    return model


def _refuse_meta_weights(model: nn.Module) -> None:
    """A model on the meta device holds no values: an adapter made there would have none either, and the
    usual way out (``to_empty`` then loading the base weights) would leave the adapter's initialization
    (lora_B = 0, IA3 = 1) as uninitialized memory, a silently wrong start."""
    on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise ConfigError(
            f"patch: the model's weights are on the meta device (no values), e.g. {on_meta[:2]}; an adapter "
            "created there would be left uninitialized when the model is materialized. Load the model's weights "
            "first (from_pretrained, or model.to_empty(device=...) then load_state_dict), then patch"
        )


def _patch(model: nn.Module, config, adapter_name: str, backend: str) -> Callable[[], None]:
    """Do the patch and return a function that undoes it exactly."""
    check_backend(backend)
    cfg = as_config(config)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ConfigError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
    state = patch_state(model)
    if state is not None and adapter_name in state.configs:
        raise ConfigError(
            f"adapter {adapter_name!r} is already patched into this model; choose another adapter_name, "
            "or remove it first with peftfast.unpatch(model)"
        )
    _refuse_meta_weights(model)
    if state is not None and state.configs:
        kinds = {type(c) for c in state.configs.values()}
        if type(cfg) not in kinds:
            raise ConfigError(
                f"this model already carries {sorted(k.__name__ for k in kinds)} adapters; mixing them with a "
                f"{type(cfg).__name__} in one model is not supported"
            )
    if isinstance(cfg, PROMPT_LEARNING_CONFIGS):
        return _patch_prompt_learning(model, cfg, adapter_name, backend, state)
    if isinstance(cfg, IA3Config) and cfg.target_modules is None:
        family = model_type(model)
        if family in DEFAULT_IA3_TARGETS:
            cfg.target_modules, ff = DEFAULT_IA3_TARGETS[family]
            if cfg.feedforward_modules is None:
                cfg.feedforward_modules = ff
    # With target_parameters, target_modules may match nothing (PEFT: target_modules=[] targets no module).
    with_params = isinstance(cfg, LoraConfig) and bool(cfg.target_parameters)
    targets = resolve_targets(model, cfg, supported_by(cfg), allow_empty=with_params)
    if with_params and cfg.target_modules and not targets:
        warnings.warn(f"target_modules={cfg.target_modules} matched no module; only target_parameters are adapted",
                      RuntimeWarning, stacklevel=3)
    bare = bare_out_projections(model, targets)
    if bare:
        raise ConfigError(
            f"{bare[:3]} are the out_proj of an nn.MultiheadAttention, whose forward never calls that layer: an "
            "adapter there would train nothing. Target the MultiheadAttention module itself (LoRA adapts both its "
            "projections), or add these names to exclude_modules"
        )
    if isinstance(cfg, IA3Config) and cfg.feedforward_modules:
        wrappable = supported_by(cfg)
        stray = [
            n for n, m in model.named_modules()
            if n and name_matches(cfg.feedforward_modules, n) and wrappable(m) and n not in targets
        ]
        if stray:
            raise ConfigError(
                f"feedforward_modules matches {stray[:5]}, which target_modules does not; every feed-forward "
                "module must also be a target"
            )
    save_names = _modules_to_save_names(model, cfg)

    undo: list = []
    grad_flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    try:
        state = _ensure_state(model, state, undo)
        installs = []
        for name in targets:
            module = model.get_submodule(name)
            if isinstance(module, AdapterLayer):
                wrapper, fresh = module, False
                if isinstance(cfg, LoraConfig) != isinstance(module, LORA_WRAPPERS):
                    raise ConfigError(f"{name} already has a {type(module).__name__}; methods cannot be stacked")
            else:
                if isinstance(cfg, LoraConfig):
                    wrapper = _lora_wrapper(module)(module, backend=backend)
                else:
                    ia3_cls = IA3Conv if is_ia3_extra(module) else IA3Layer
                    wrapper = ia3_cls(module, feedforward=name_matches(cfg.feedforward_modules, name), backend=backend)
                fresh = True
            # before the adapter is added: an init from the base (PiSSA/OLoRA) changes the base weight, and a
            # later failure must put it back even where the wrapper itself is thrown away
            undo.append(lambda w=wrapper: restore_base(w, adapter_name))
            if not fresh:
                undo.append(lambda w=wrapper: w.delete_adapter(adapter_name))
            _add_adapter(wrapper, name, cfg, adapter_name)
            if fresh:
                installs.append((name, module, wrapper))
                # a wrapper that also places layers inside its base (MultiheadAttention's out_proj)
                installs.extend(getattr(wrapper, "nested_installs", lambda _: [])(name))
        param_keys: list = []
        if with_params:  # LoRA on raw parameters (MoE expert stacks): peftfast.layers.params
            param_installs, param_undo, param_keys = build_parameter_wrappers(
                model, cfg, adapter_name, backend, targets, dict(state.configs), _pattern_value)
            undo.extend(param_undo)
            installs.extend(param_installs)
            warn_unmatched(cfg, param_keys, targets)
        if isinstance(cfg, LoraConfig):
            _warn_unused_patterns(cfg, targets + param_keys)
        if isinstance(cfg, LoraConfig) and cfg.trainable_token_indices is not None:
            _add_trainable_tokens(model, cfg, adapter_name, backend, targets, save_names, installs, undo)
        for name in save_names:
            module = model.get_submodule(name)
            wrapper, fresh = (module, False) if isinstance(module, ModulesToSave) else (ModulesToSave(module), True)
            wrapper.add_adapter(adapter_name)
            if fresh:
                installs.append((name, module, wrapper))
            else:
                undo.append(lambda w=wrapper: w.delete_adapter(adapter_name))
        for name, module, wrapper in installs:  # nothing below can fail: install everything at once
            parent, attr = _parent(model, name)
            setattr(parent, attr, wrapper)
            undo.append(lambda p=parent, a=attr, m=module: setattr(p, a, m))
        _register(model, state, cfg, adapter_name, targets, undo)
    except BaseException:
        _undo(undo, grad_flags)
        raise
    return lambda: _undo(undo, grad_flags, model)


def _token_layer_names(model: nn.Module, cfg: LoraConfig) -> dict:
    """trainable_token_indices as {module name: token ids}; a bare list means the input embedding."""
    spec = cfg.trainable_token_indices
    if not isinstance(spec, dict):
        get_in = getattr(model, "get_input_embeddings", None)
        layer = get_in() if callable(get_in) else None
        names = [n for n, m in model.named_modules() if layer is not None and m is layer]
        if not names:
            raise ConfigError(
                "trainable_token_indices is a list, which means the input embedding, but this "
                f"{type(model).__name__} has no get_input_embeddings(); pass a dict {{'<embedding name>': [ids]}}"
            )
        return {names[0]: list(spec)}
    found = {}
    for key, ids in spec.items():
        hits = [n for n, _ in model.named_modules() if n == key or n.endswith("." + key)]
        if not hits:
            raise ConfigError(f"trainable_token_indices names {key!r}, but the model has no module of that name")
        for n in hits:
            found[n] = list(ids)
    return found


def _add_trainable_tokens(model, cfg, adapter_name, backend, targets, save_names, installs, undo) -> None:
    """Wrap the embeddings named by trainable_token_indices (and a head tied to one), undoably."""
    layers = _token_layer_names(model, cfg)
    clash = [n for n in layers if n in targets or n in save_names]
    if clash:
        raise ConfigError(
            f"{clash} are both LoRA targets / modules_to_save and in trainable_token_indices; PEFT refuses this "
            "too: train the layer one way (drop it from target_modules / modules_to_save, or from "
            "trainable_token_indices)"
        )
    fresh_by_module = {}
    for name, ids in layers.items():
        module = model.get_submodule(name)
        if isinstance(module, TrainableTokensLayer):
            wrapper = module
            wrapper.add_adapter(adapter_name, ids)
            undo.append(lambda w=wrapper: w.delete_adapter(adapter_name))
            continue
        wrapper = TrainableTokensLayer(module, backend=backend)
        wrapper.add_adapter(adapter_name, ids)
        installs.append((name, module, wrapper))
        fresh_by_module[id(module)] = wrapper
    # A head whose weight *is* a wrapped embedding's (tied word embeddings) shows the same trained rows.
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None or isinstance(head, AdapterLayer):
        return
    owner = next((w for w in fresh_by_module.values() if w.base_layer.weight is getattr(head, "weight", None)), None)
    head_names = [n for n, m in model.named_modules() if m is head]
    if owner is not None and head_names and head_names[0] not in layers and isinstance(head, nn.Linear):
        installs.append((head_names[0], head, TrainableTokensLayer(head, backend=backend, tied_to=owner)))


def _ensure_state(model: nn.Module, state: Optional[PatchState], undo: list) -> PatchState:
    """The model's patch state, created (undoably) on its first patch."""
    if state is not None:
        return state
    state = PatchState()
    state.original_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.__dict__["peftfast_state"] = state
    undo.append(lambda: model.__dict__.pop("peftfast_state", None))
    return state


def _register(model: nn.Module, state: PatchState, cfg, adapter_name: str, target_names, undo: list) -> None:
    """Record an installed adapter, make it active if none is, and set what trains (undoably)."""
    state.configs[adapter_name] = cfg
    state.target_names[adapter_name] = list(target_names)
    undo.append(lambda: (state.configs.pop(adapter_name, None), state.target_names.pop(adapter_name, None)))
    previous_active = list(state.active)
    undo.append(lambda: setattr(state, "active", previous_active))
    if not state.active:
        state.active = [adapter_name]
    _apply_trainable(model, state)


def _undo(undo: list, grad_flags: dict, model: Optional[nn.Module] = None) -> None:
    """Run the undo steps newest first, then restore every parameter's requires_grad. With ``model``, the
    wrappers that remain are also set back to the adapters active before (a later patch's rollback)."""
    for step in reversed(undo):
        step()
    if model is not None and patch_state(model) is not None:
        _set_layers_active(model, patch_state(model).active)
    for p, flag in grad_flags.values():
        p.requires_grad_(flag)


LORA_WRAPPERS = (LoraLayer, LoraEmbedding, LoraConv, LoraMultiheadAttention)


def supported_by(cfg) -> Callable[[nn.Module], bool]:
    """The module types a LoRA / IA3 config can wrap (what ``resolve_targets`` accepts)."""
    if isinstance(cfg, LoraConfig):
        return lambda m: is_linear_like(m) or is_lora_extra(m)
    return lambda m: is_linear_like(m) or is_ia3_extra(m)


def _lora_wrapper(module: nn.Module) -> type:
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, CONV_TYPES):
        return LoraConv
    if isinstance(module, nn.MultiheadAttention):
        return LoraMultiheadAttention
    return LoraLayer


def _patch_prompt_learning(model: nn.Module, cfg, adapter_name: str, backend: str, state) -> Callable[[], None]:
    """Prefix / prompt tuning: an encoder module on the model plus a forward hook (see prompt_learning), and
    trainable copies of the ``modules_to_save`` (the classification head for SEQ_CLS / TOKEN_CLS, as PEFT)."""
    save_names = _modules_to_save_names(model, cfg)
    undo: list = []
    grad_flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    try:
        state = _ensure_state(model, state, undo)
        undo.extend(add_prompt_learning(model, cfg, adapter_name, backend))
        for name in save_names:
            module = model.get_submodule(name)
            if isinstance(module, ModulesToSave):
                module.add_adapter(adapter_name)
                undo.append(lambda w=module: w.delete_adapter(adapter_name))
                continue
            wrapper = ModulesToSave(module)
            wrapper.add_adapter(adapter_name)
            parent, attr = _parent(model, name)
            setattr(parent, attr, wrapper)
            undo.append(lambda p=parent, a=attr, m=module: setattr(p, a, m))
        _register(model, state, cfg, adapter_name, [], undo)
    except BaseException:
        _undo(undo, grad_flags)
        raise
    return lambda: _undo(undo, grad_flags)


def _add_adapter(wrapper: AdapterLayer, name: str, cfg, adapter_name: str) -> None:
    if isinstance(cfg, LoraConfig):
        r = _pattern_value(cfg.rank_pattern, name, cfg.r)
        alpha = _pattern_value(cfg.alpha_pattern, name, cfg.lora_alpha)
        if not isinstance(r, int) or r <= 0:
            raise ConfigError(f"LoRA rank for {name} must be a positive integer, got {r!r}")
        if is_base_init(cfg.init_lora_weights) and not isinstance(wrapper, (LoraLayer, LoraEmbedding)):
            # PEFT refuses it on convolutions ("Unknown initialization"); on embeddings it uses the default
            # init (A zero, B normal), which LoraEmbedding does for every init but False
            raise ConfigError(
                f"init_lora_weights={cfg.init_lora_weights!r} works on linear layers only (as in PEFT), but {name} "
                f"is a {type(wrapper.base_layer).__name__}; leave it out of target_modules or use init True"
            )
        if cfg.init_lora_weights == "loftq" and not isinstance(wrapper, LoraLayer):
            # PEFT's Embedding.loftq_init is called without the config it needs (a TypeError there)
            raise ConfigError(f"init_lora_weights='loftq' works on linear layers only, but {name} is a "
                              f"{type(wrapper.base_layer).__name__}; leave it out of target_modules")
        extra = {"loftq_config": cfg.loftq_config} if isinstance(wrapper, LoraLayer) else {}
        wrapper.add_adapter(
            adapter_name, r, alpha, dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
            init=cfg.init_lora_weights, lora_bias=cfg.lora_bias, **extra,
        )
    else:
        wrapper.add_adapter(adapter_name, init=cfg.init_ia3_weights)


def _adapter_wrappers(model: nn.Module) -> Iterator[tuple]:
    for name, module in model.named_modules():
        if isinstance(module, (AdapterLayer, ModulesToSave, PromptLearning)):
            yield name, module


def _set_layers_active(model: nn.Module, active: list, trainable: bool = True) -> None:
    for _, module in _adapter_wrappers(model):
        module.set_active(active, trainable)


def _apply_trainable(model: nn.Module, state: PatchState) -> None:
    """Freeze the base; the active adapters (and their modules_to_save and biases per config) train."""
    for p in model.parameters():
        p.requires_grad_(False)
    _set_layers_active(model, state.active)
    for name in state.active:
        cfg = state.configs[name]
        bias = getattr(cfg, "bias", "none")
        if bias == "all":
            for pname, p in model.named_parameters():
                # PEFT's rule: a parameter named "bias" (not MultiheadAttention's in_proj_bias, nor an MoE
                # expert stack's gate_up_proj_bias)
                if (pname == "bias" or pname.endswith(".bias")) and ".modules_to_save." not in pname:
                    p.requires_grad_(True)
        elif bias == "lora_only":
            # PEFT trains the bias of every LoRA-wrapped layer (convolutions and embeddings too), not just
            # the linear ones.
            for _, module in _adapter_wrappers(model):
                if isinstance(module, LORA_WRAPPERS) and getattr(module.base_layer, "bias", None) is not None:
                    module.base_layer.bias.requires_grad_(True)


def set_adapter(model: nn.Module, adapter_name: Union[str, list]) -> None:
    """Make the named adapter(s) active (and trainable); the others stay loaded but inactive and frozen.

    Args:
        model: a patched model.
        adapter_name: one name, or a list of names whose outputs are summed (LoRA) or multiplied (IA3).

    Example:
        >>> peftfast.set_adapter(model, "task_b")  # doctest: +SKIP
    """
    state = _require_state(model)
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    unknown = [n for n in names if n not in state.configs]
    if unknown or not names:
        raise ConfigError(f"unknown adapter(s) {unknown}; this model has {sorted(state.configs)}")
    state.active = names
    _apply_trainable(model, state)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: inside it the model computes with its base weights only.

    Example:
        >>> with peftfast.disable_adapters(model):  # doctest: +SKIP
        ...     base_logits = model(ids).logits
    """
    _require_state(model)
    wrappers = [m for _, m in _adapter_wrappers(model)]
    before = [m.disabled for m in wrappers]
    for m in wrappers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, flag in zip(wrappers, before):
            m.disabled = flag


def merge(model: nn.Module, adapter_names: Optional[list] = None, *, keep_original: bool = False) -> None:
    """Fold the active (or the named) adapters into the base weights; forward then skips the adapter math.

    4-bit and 8-bit bases are dequantized, merged and requantized (lossy, as in PEFT).

    Args:
        model: a patched model.
        adapter_names: the adapters to merge (default: the active ones).
        keep_original: keep a copy of each dense base weight (one more copy of the adapted layers in
            memory) so that :func:`unmerge` and :func:`unpatch` restore it bit for bit; without it they
            subtract the update again, which is exact only up to float rounding (~1e-7 relative in fp32).
            Dense bases only (ValueError for a quantized one).

    Example:
        >>> peftfast.merge(model, keep_original=True)  # doctest: +SKIP
    """
    state = _require_state(model)
    names = adapter_names or state.active
    wrappers = [m for _, m in _adapter_wrappers(model) if isinstance(m, AdapterLayer)]
    if keep_original:
        try:  # every copy (or the refusal of a quantized weight) before anything merges
            for module in wrappers:
                module._keep_original()
        except ValueError:
            for module in wrappers:
                module.__dict__.pop("_original", None)
            raise
    for module in wrappers:
        module.merge(list(names))


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`: bit for bit after ``merge(model, keep_original=True)``, otherwise exact up to
    float rounding.

    Example:
        >>> peftfast.unmerge(model)  # doctest: +SKIP
    """
    _require_state(model)
    for _, module in _adapter_wrappers(model):
        if isinstance(module, AdapterLayer) and not module._restore_original():
            module.unmerge()


def unpatch(model: nn.Module, *, merge_adapters: bool = False) -> nn.Module:
    """Remove every adapter and put the original modules back.

    Args:
        model: a patched model.
        merge_adapters: fold the active adapters into the base weights first (PEFT's
            ``merge_and_unload``); otherwise merged adapters are unmerged and the original modules and
            ``requires_grad`` flags come back: bit for bit unless a :func:`merge` without
            ``keep_original=True`` changed the weights (then up to float rounding, see :func:`merge`).

    Returns:
        The same model object.

    Example:
        >>> peftfast.unpatch(model)  # doctest: +SKIP
    """
    state = _require_state(model)
    if merge_adapters:
        merge(model)
    remove_prompt_learning(model)
    # innermost first: a wrapper placed inside another's base (MultiheadAttention's out_proj), or wrappers
    # of several parameters of one module (layers.params), nest; each is put back while its path still resolves
    for name, module in reversed(list(_adapter_wrappers(model))):
        try:
            model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, AdapterLayer):
            if not merge_adapters and not module._restore_original():
                module.unmerge()
            if merge_adapters:
                forget_base(module)  # the merged weight is the model now
            else:
                restore_base(module)  # the weight a PiSSA/OLoRA init replaced, bit for bit
            original = module.base_layer
        else:
            original = module.original_module
            if merge_adapters and module.active_adapters:
                original = module.modules_to_save[module.active_adapters[0]]
        parent, attr = _parent(model, name)
        setattr(parent, attr, original)
    flags = state.original_requires_grad
    for pname, p in model.named_parameters():
        if pname in flags:
            p.requires_grad_(flags[pname])
    model.__dict__.pop("peftfast_state", None)
    return model


def adapter_config(model: nn.Module, adapter_name: str = "default"):
    """The config an adapter was patched with."""
    state = _require_state(model)
    if adapter_name not in state.configs:
        raise ConfigError(f"no adapter named {adapter_name!r}; this model has {sorted(state.configs)}")
    return state.configs[adapter_name]


def _param_count(p) -> int:
    n = p.numel()
    if p.__class__.__name__ == "Params4bit":  # two 4-bit values per byte of storage (PEFT counts it so)
        n = n * 2 * p.element_size()
    return n


def trainable_parameters(model: nn.Module) -> tuple:
    """Count parameters as PEFT does (a 4-bit weight counts its unpacked values).

    Returns:
        ``(trainable, total)``.

    Example:
        >>> trainable, total = peftfast.trainable_parameters(model)  # doctest: +SKIP
    """
    trainable = total = 0
    for p in model.parameters():
        n = _param_count(p)
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: X || all params: Y || trainable%: Z`` (PEFT's wording).

    Example:
        >>> peftfast.print_trainable_parameters(model)  # doctest: +SKIP
        trainable params: 8,192 || all params: 1,032,192 || trainable%: 0.7937
    """
    trainable, total = trainable_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")
