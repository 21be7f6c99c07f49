"""Adapter configurations with Hugging Face PEFT's field names, defaults and JSON.

``patch`` accepts these, the same-named ``peft`` config objects, a plain dict, or a path to an
``adapter_config.json`` (or the directory holding it); :func:`as_config` turns any of them into one of
the classes below. Fields PEFT writes that peftfast does not implement are accepted while they hold
their inert default, and refused with a clear error otherwise: a silently ignored option would train a
different model than the user asked for.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

CONFIG_NAME = "adapter_config.json"
SEQ_CLS_HEADS = ["classifier", "score"]
TASK_HEADS = {"SEQ_CLS": SEQ_CLS_HEADS, "TOKEN_CLS": SEQ_CLS_HEADS, "QUESTION_ANS": ["qa_outputs"]}
TASK_TYPES = (None, "SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")

# Fields PEFT writes for features peftfast does not implement, with the value meaning "not used".
_INERT_FIELDS = {
    "alora_invocation_tokens": (None,), "arrow_config": (None,), "corda_config": (None,),
    "eva_config": (None,), "kasa_config": (None,), "layer_replication": (None,),
    "lora_ga_config": (None,), "megatron_config": (None,), "megatron_core": ("megatron.core", None),
    "monteclora_config": (None,),
    "use_bdlora": (None, False), "use_qalora": (False,), "qalora_group_size": None, "velora_config": (None,),
    "ensure_weight_tying": (False,), "auto_mapping": None, "peft_version": None, "runtime_config": None,
    "inference_mode": None, "use_dora_for_embedding": None,
}


class ConfigError(ValueError):
    """A configuration or input that peftfast cannot honour, with the reason and the fix in its message.

    Raised by every refusal of the library (config validation, patch, merge, save, the layer wrappers), so
    callers can catch one type: the CLI turns it into one ``peftfast <command>: error:`` line and exit 2.
    """


# JSON types of the fields with a plain type ("Optional[X]" also takes null). A field that must hold a number
# but holds a string (``"lora_alpha": "16"``) or a bool written as a string (``"use_rslora": "false"``, which
# Python reads as true) is refused by name instead of failing later or meaning something else.
_JSON_TYPES = {"bool": ((bool,), "true or false"), "int": ((int,), "an integer"),
               "float": ((int, float), "a number"), "str": ((str,), "a string"), "dict": ((dict,), "an object"),
               "list": ((list,), "a list")}
# Fields whose annotation is narrower than what PEFT writes (lora_alpha is often 16.0).
_TYPE_OVERRIDES = {"lora_alpha": "float"}


def _check_field_types(config) -> None:
    for f in dataclasses.fields(config):
        spec = _TYPE_OVERRIDES.get(f.name, f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
        optional = spec.startswith("Optional[") and spec.endswith("]")
        kind = spec[len("Optional["):-1] if optional else spec
        if kind not in _JSON_TYPES:
            continue
        value = getattr(config, f.name)
        if value is None and optional:
            continue
        types, words = _JSON_TYPES[kind]
        if not isinstance(value, types) or (kind in ("int", "float") and isinstance(value, bool)):
            raise ConfigError(
                f"{type(config).__name__}.{f.name} must be {words}{' or null' if optional else ''}, got {value!r} "
                f"({type(value).__name__})" + (
                    f"; in adapter_config.json write it without quotes, e.g. \"{f.name}\": "
                    f"{json.dumps(f.default) if f.default is not dataclasses.MISSING else '...'}"
                    if isinstance(value, str) else "")
            )


@dataclass
class _BaseConfig:
    peft_type: str = ""
    task_type: Optional[str] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    modules_to_save: Optional[list] = None

    def validate(self) -> None:
        if self.task_type not in TASK_TYPES:
            raise ConfigError(f"task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        _check_field_types(self)

    def effective_modules_to_save(self) -> list:
        """``modules_to_save`` plus the heads PEFT adds for classification tasks."""
        names = list(self.modules_to_save or [])
        for head in TASK_HEADS.get(self.task_type or "", []):
            if head not in names:
                names.append(head)
        return names

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, set):
                out[k] = sorted(v)
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "_BaseConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs, refused = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _INERT_FIELDS:
                allowed = _INERT_FIELDS[key]
                if allowed is not None and value not in allowed:
                    refused.append(f"{key}={value!r}")
            elif value not in (None, False, {}, []):
                refused.append(f"{key}={value!r}")
        if refused:
            raise ConfigError(
                f"{cls.__name__}: peftfast does not implement {', '.join(refused)}; remove these fields or "
                "use Hugging Face PEFT for this adapter"
            )
        peft_type = kwargs.pop("peft_type", cls.peft_type_name)
        if peft_type != cls.peft_type_name:
            raise ConfigError(f"{cls.__name__} got peft_type={peft_type!r}")
        config = cls(**kwargs)
        config.validate()
        return config

    peft_type_name = ""


@dataclass
class LoraConfig(_BaseConfig):
    """LoRA (and rsLoRA, DoRA). Same fields and defaults as ``peft.LoraConfig``.

    Args:
        r: rank. lora_alpha: scaling numerator (scaling = alpha / r, or alpha / sqrt(r) with rsLoRA).
        target_modules: list of module names or suffixes, a regex (full match), or "all-linear"
            (every linear layer but the output head). None: the family's default (q/v projections).
        exclude_modules: same forms; wins over target_modules.
        lora_dropout: dropout on the LoRA branch's input.
        fan_in_fan_out: the base stores [in, out] (GPT-2's Conv1D); set automatically for Conv1D.
        bias: "none", "all" or "lora_only": which biases train.
        lora_bias: give lora_B a trainable bias (zero at init), scaled like the LoRA term; merging adds it
            to the base layer's bias. Not with DoRA, nor on embeddings (as in PEFT).
        trainable_token_indices: train only these rows of the input embedding (a list of token ids), or of
            the named embeddings (``{"embed_tokens": [ids]}``); a tied output head follows (PEFT's format).
        target_parameters: LoRA on raw ``nn.Parameter`` weights by name (a full parameter name or a dotted
            suffix, e.g. ``["experts.gate_up_proj", "experts.down_proj"]``), above all MoE expert stacks
            [E, ., .]; see ``peftfast.layers.params``. ``target_modules=[]`` then adapts no module.
        use_rslora, use_dora: the variants.
        init_lora_weights: True (PEFT: A Kaiming-uniform, B zero), "gaussian" (A normal(1/r)), False
            (random non-zero B, for tests), or from the base weight, which then keeps only the residual
            ``W - scaling * B @ A``: "pissa" (SVD), "pissa_niter_<n>" (randomized SVD, n subspace
            iterations), "olora" (QR), or "loftq" (with ``loftq_config``: the base becomes its LoftQ NF4
            quantization, dequantized; see :mod:`peftfast.lora_init`).
        loftq_config: for ``init_lora_weights="loftq"``: ``{"loftq_bits": 4, "loftq_iter": T}`` or a
            :class:`LoftQConfig` (PEFT's also works); ignored (with a warning) for the other inits.
        layers_to_transform / layers_pattern: restrict to these layer indices.
        rank_pattern / alpha_pattern: per-module overrides, keys are regexes matched at a name's end.
        modules_to_save: extra modules trained in full and saved (classification heads for SEQ_CLS).

    Example:
        >>> cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    """

    peft_type: str = "LORA"
    r: int = 8
    lora_alpha: int = 8
    target_modules: Optional[Union[list, str]] = None
    exclude_modules: Optional[Union[list, str]] = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list, int]] = None
    layers_pattern: Optional[Union[list, str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    trainable_token_indices: Optional[Union[list, dict]] = None
    target_parameters: Optional[list] = None
    loftq_config: dict = field(default_factory=dict)
    peft_type_name = "LORA"

    def validate(self) -> None:
        from .lora_init import check_loftq_config, parse_init  # here: lora_init imports this module

        parse_init(self.init_lora_weights)  # refuses unknown values, and PEFT's inits peftfast lacks (CorDA, ...)
        # a LoftQConfig object becomes the dict PEFT writes, before the field-type check
        self.loftq_config = check_loftq_config(self.init_lora_weights, self.loftq_config)
        super().validate()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        for key, rank in (self.rank_pattern or {}).items():
            if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
                raise ConfigError(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        # alpha 0 makes the scaling 0: the adapter's output and its gradients are zero, so it never trains.
        if self.lora_alpha == 0 or not math.isfinite(self.lora_alpha):
            raise ConfigError(f"lora_alpha must be a non-zero finite number, got {self.lora_alpha!r} (scaling = "
                              "lora_alpha / r: 0 gives an adapter that outputs nothing and never trains)")
        for key, alpha in (self.alpha_pattern or {}).items():
            if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha == 0 or not math.isfinite(alpha):
                raise ConfigError(f"alpha_pattern[{key!r}] must be a non-zero finite number, got {alpha!r}")
        if self.layers_to_transform is not None:
            layers = [self.layers_to_transform] if isinstance(self.layers_to_transform, int) else self.layers_to_transform
            if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ConfigError(f"layers_to_transform must be a layer index or a list of them, got "
                                  f"{self.layers_to_transform!r}")
            if isinstance(self.target_modules, str):
                # PEFT refuses this too: a regex (or "all-linear") is matched against whole names and
                # layers_to_transform would be silently ignored.
                raise ConfigError(
                    f"layers_to_transform cannot be used with target_modules={self.target_modules!r} (a regex or "
                    "'all-linear'); give target_modules as a list of names (e.g. ['q_proj', 'v_proj']), or put the "
                    "layer indices into the regex"
                )
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights == "loftq":
            if self.target_parameters:
                raise ConfigError("init_lora_weights='loftq' does not apply to target_parameters (PEFT's "
                                  "ParamWrapper calls its LoftQ init without the config and fails); use init True")
            scalings = {self.lora_alpha, *(self.alpha_pattern or {}).values()}
            if self.use_rslora or self.rank_pattern or scalings != {self.r}:
                import warnings

                warnings.warn(
                    "init_lora_weights='loftq' with lora_alpha != r (or rsLoRA / rank and alpha patterns): LoftQ's "
                    "B A approximates W - deq(Q) unscaled (PEFT's convention, kept here), so the patched model "
                    "starts at deq(Q) + scaling * B A, which equals the LoftQ approximation only where scaling == 1",
                    stacklevel=3,
                )
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ConfigError(
                f"lora_bias=True needs init_lora_weights True or False, got {self.init_lora_weights!r} (as in PEFT)"
            )
        if self.lora_bias and self.use_dora:
            raise ConfigError("lora_bias=True is not supported with DoRA (as in PEFT); set use_dora=False")
        _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)
        _check_token_indices(self.trainable_token_indices)
        if self.target_parameters is not None:
            if not isinstance(self.target_parameters, list) or not all(isinstance(t, str) and t for t in self.target_parameters):
                raise ConfigError(f"target_parameters must be a list of parameter names (e.g. ['experts.gate_up_proj']) "
                                  f"or None, got {self.target_parameters!r} (PEFT does not take a regex here either)")


@dataclass
class LoftQConfig:
    """PEFT's ``LoftQConfig``: the quantization LoftQ initializes against (``LoraConfig.loftq_config``).

    Args:
        loftq_bits: 4 (NF4; PEFT's 8-bit variant is not implemented in peftfast).
        loftq_iter: alternating quantize / SVD steps, >= 1.

    Example:
        >>> cfg = LoraConfig(r=8, lora_alpha=8, init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_iter=5))
    """

    loftq_bits: int = 4
    loftq_iter: int = 1


def _check_token_indices(value) -> None:
    if value is None:
        return
    lists = value.values() if isinstance(value, dict) else [value]
    ok = (not isinstance(value, dict) or all(isinstance(k, str) for k in value)) and all(
        isinstance(v, (list, tuple)) and v and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
        for v in lists
    )
    if not ok:
        raise ConfigError(
            "trainable_token_indices must be a non-empty list of token ids, or a dict of embedding module names to "
            f"such lists, got {value!r}"
        )


@dataclass
class IA3Config(_BaseConfig):
    """IA3: learned vectors scaling the outputs of target layers (inputs of ``feedforward_modules``).

    Example:
        >>> cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    """

    peft_type: str = "IA3"
    target_modules: Optional[Union[list, str]] = None
    exclude_modules: Optional[Union[list, str]] = None
    feedforward_modules: Optional[Union[list, str]] = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True
    peft_type_name = "IA3"

    def validate(self) -> None:
        super().validate()
        _check_targets("target_modules", self.target_modules)
        _check_targets("feedforward_modules", self.feedforward_modules)
        if (
            isinstance(self.target_modules, (list, tuple, set))
            and isinstance(self.feedforward_modules, (list, tuple, set))
        ):
            outside = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if outside:
                raise ConfigError(
                    f"feedforward_modules {outside} are not in target_modules {sorted(self.target_modules)}; "
                    "every feed-forward module must also be a target"
                )


@dataclass
class _PromptLearningConfig(_BaseConfig):
    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens must be set to a positive integer, got {self.num_virtual_tokens!r}")


@dataclass
class PrefixTuningConfig(_PromptLearningConfig):
    """Prefix tuning: learned key/value vectors prepended in every attention layer.

    Example:
        >>> cfg = PrefixTuningConfig(num_virtual_tokens=16, task_type="CAUSAL_LM")
    """

    peft_type: str = "PREFIX_TUNING"
    init_weights: Optional[str] = None
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    peft_type_name = "PREFIX_TUNING"


@dataclass
class PromptTuningConfig(_PromptLearningConfig):
    """Prompt tuning: learned virtual-token embeddings placed before the input.

    Example:
        >>> cfg = PromptTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM")
    """

    peft_type: str = "PROMPT_TUNING"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None
    peft_type_name = "PROMPT_TUNING"


@dataclass
class PromptEncoderConfig(_PromptLearningConfig):
    """P-tuning: virtual-token embeddings produced by a small encoder (PEFT's ``PromptEncoder``) and placed
    before the input, as in prompt tuning. Same fields and defaults as ``peft.PromptEncoderConfig``.

    Args:
        encoder_reparameterization_type: "MLP" (three linear layers with ReLU) or "LSTM" (a bidirectional
            LSTM followed by a two-layer MLP).
        encoder_hidden_size: the encoder's hidden width; None: the model's hidden size.
        encoder_num_layers: the LSTM's layer count (the MLP always has PEFT's fixed depth).
        encoder_dropout: dropout between the LSTM's layers.

    Example:
        >>> cfg = PromptEncoderConfig(num_virtual_tokens=8, task_type="CAUSAL_LM", encoder_hidden_size=128)
    """

    peft_type: str = "P_TUNING"
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    peft_type_name = "P_TUNING"

    def validate(self) -> None:
        super().validate()
        kind = getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type)
        if kind not in ("MLP", "LSTM"):
            raise ConfigError(f"encoder_reparameterization_type must be 'MLP' or 'LSTM', got {kind!r}")
        self.encoder_reparameterization_type = kind
        if self.encoder_hidden_size is not None and (
            not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0
        ):
            raise ConfigError(
                f"encoder_hidden_size must be a positive integer or None, got {self.encoder_hidden_size!r}"
            )
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers <= 0:
            raise ConfigError(f"encoder_num_layers must be a positive integer, got {self.encoder_num_layers!r}")
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")


CONFIG_CLASSES = {
    c.peft_type_name: c for c in (LoraConfig, IA3Config, PrefixTuningConfig, PromptTuningConfig, PromptEncoderConfig)
}
AnyConfig = Union[LoraConfig, IA3Config, PrefixTuningConfig, PromptTuningConfig, PromptEncoderConfig]
# The prompt-learning configs: an encoder on the model plus a forward hook (peftfast.prompt_learning).
PROMPT_LEARNING_CONFIGS = (PrefixTuningConfig, PromptTuningConfig, PromptEncoderConfig)


def _check_targets(name: str, value) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a list of module names, a regex string or None, got {value!r}")


def load_config_file(path: Union[str, os.PathLike]) -> dict:
    """Read adapter_config.json from a file or from the directory holding it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter config at {path}; an adapter directory holds {CONFIG_NAME}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e


def as_config(config: Any) -> AnyConfig:
    """Turn a peftfast config, a ``peft`` config, a dict or an adapter_config.json path into a peftfast config.

    Args:
        config: any of the accepted forms.

    Returns:
        A validated :class:`LoraConfig`, :class:`IA3Config`, :class:`PrefixTuningConfig`,
        :class:`PromptTuningConfig` or :class:`PromptEncoderConfig` (a fresh object: the caller's config is
        never modified).

    Example:
        >>> as_config({"peft_type": "LORA", "r": 4}).r
        4
    """
    if isinstance(config, tuple(CONFIG_CLASSES.values())):
        data = config.to_dict()
    elif isinstance(config, (str, os.PathLike)):
        data = load_config_file(config)
    elif isinstance(config, dict):
        data = dict(config)
    elif hasattr(config, "to_dict") and hasattr(config, "peft_type"):  # a peft config object
        data = config.to_dict()
    else:
        raise ConfigError(
            f"cannot use a {type(config).__name__} as an adapter config; pass a peftfast/peft LoraConfig, "
            "IA3Config, PrefixTuningConfig, PromptTuningConfig, PromptEncoderConfig, a dict or a path to "
            "adapter_config.json"
        )
    peft_type = data.get("peft_type")
    peft_type = getattr(peft_type, "value", peft_type)
    if isinstance(peft_type, str):
        peft_type = peft_type.upper()
    task_type = data.get("task_type")
    data["task_type"] = getattr(task_type, "value", task_type)
    if peft_type is None:
        peft_type = "LORA"
    if peft_type not in CONFIG_CLASSES:
        raise ConfigError(f"peft_type {peft_type!r} is not supported by peftfast; supported: {sorted(CONFIG_CLASSES)}")
    data["peft_type"] = peft_type
    for key in ("target_modules", "exclude_modules", "feedforward_modules", "modules_to_save", "target_parameters"):
        if isinstance(data.get(key), (set, tuple)):
            data[key] = sorted(data[key])
    return CONFIG_CLASSES[peft_type].from_dict(data)
