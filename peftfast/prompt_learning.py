"""Prefix tuning and prompt tuning: virtual tokens in front of the real ones.

Both methods keep Hugging Face PEFT's semantics exactly, so adapters trained with either library give
the same logits in the other:

* **Prompt tuning** prepends ``P`` learned embeddings to ``inputs_embeds`` (attention mask extended
  with ones, labels with -100).
* **P-tuning** is prompt tuning whose embeddings come out of a small encoder (PEFT's MLP or LSTM
  ``PromptEncoder``); the same path feeds them, and checkpoints hold the encoder's output.
* **Prefix tuning** prepends ``P`` learned key/value vectors in every attention layer. Every query sees
  the whole prefix, padding is masked, and the real tokens sit at positions ``P..P+N-1`` as if the
  prefix were a KV cache of length ``P`` (which is how PEFT feeds it).

Task types: ``CAUSAL_LM``, ``SEQ_CLS`` and ``TOKEN_CLS`` (prefix tuning only: prompt tuning would give the
virtual tokens labels too), whose heads train as ``modules_to_save`` (see patching), and ``SEQ_2_SEQ_LM`` on
encoder-decoder models (the end of this file). Classification prompt tuning keeps ``token_type_ids`` (type 0
for the virtual tokens) and leaves the labels alone, as PEFT does.

How prefix tuning is wired (decoder-only and encoder models), by one mechanism for every family using transformers' attention
interface (Llama, Qwen2, Mistral, GPT-2, OPT, ...):

1. A forward pre-hook on the top-level model computes the prefix *once per forward* from the
   encoder (``[layers][Hkv, P, D]``, no batch dimension), and passes it down as a keyword argument:
   transformers forwards extra keyword arguments to the attention function, also under gradient
   checkpointing, so nothing is cached on modules between steps (FSDP/ZeRO swap storage freely).
2. It gives the model a :class:`PrefixCache` that *reports* ``P`` extra past tokens, so the model
   itself computes positions (RoPE, learned or OPT's mask-based ones) and the ``[B, 1, N, P+N]`` mask
   exactly as with PEFT's cache; the cache stores only real tokens (generation).
3. The model's attention implementation is switched to ``peftfast_prefix_sdpa``, which sees the real
   K/V plus the prefix: on CUDA it calls the fused ``kernels.prefix_attention`` (the prefix is never
   concatenated or expanded over the batch); elsewhere it concatenates and runs SDPA, like PEFT.
"""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Optional

import torch
import torch.nn as nn

from .config import ConfigError, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

# Configs whose virtual tokens are embeddings placed before the input (prompt tuning and P-tuning).
PROMPT_CONFIGS = (PromptTuningConfig, PromptEncoderConfig)

ATTN_PREFIX = "peftfast_prefix_"
SUPPORTED_ATTENTION = ("sdpa", "eager")
PREFIX_KWARG = "peftfast_prefix"
ENCODER_ATTR = "peftfast_prompt_learning"
# Task types whose forward semantics peftfast reproduces (PEFT's PeftModelForCausalLM, ...ForSequenceClassification
# and ...ForTokenClassification); the classification ones also train their head (modules_to_save).
SUPPORTED_TASKS = (None, "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM")
CLASSIFICATION_TASKS = ("SEQ_CLS", "TOKEN_CLS")


# --------------------------------------------------------------------------------------------------
# Encoders (parameters), with PEFT's shapes
# --------------------------------------------------------------------------------------------------


class PrefixEncoder(nn.Module):
    """The prefix parameters: ``embedding`` [P, 2 * layers * Hkv * D], or with ``prefix_projection`` a
    [P, token_dim] embedding fed through a two-layer tanh MLP (PEFT's reparametrization)."""

    def __init__(self, cfg: PrefixTuningConfig, projection: bool):
        super().__init__()
        p, width = cfg.num_virtual_tokens, cfg.num_layers * 2 * cfg.token_dim
        self.projection = projection
        if projection:
            self.embedding = nn.Embedding(p, cfg.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(cfg.token_dim, cfg.encoder_hidden_size), nn.Tanh(), nn.Linear(cfg.encoder_hidden_size, width)
            )
            if cfg.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(p, width)
            if cfg.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def prompt_embeddings(self) -> torch.Tensor:
        """[P, 2 * layers * Hkv * D]: what PEFT saves as ``prompt_embeddings``."""
        w = self.embedding.weight
        return self.transform(w) if self.projection else w


class PromptEmbedding(nn.Module):
    """Virtual-token embeddings [P, hidden] placed before the input embeddings."""

    def __init__(self, cfg: PromptTuningConfig, word_embeddings: nn.Module):
        super().__init__()
        total = cfg.num_virtual_tokens * cfg.num_transformer_submodules
        self.embedding = nn.Embedding(total, cfg.token_dim)
        init = str(getattr(cfg.prompt_tuning_init, "value", cfg.prompt_tuning_init)).upper()
        if cfg.inference_mode or init == "RANDOM":
            return
        with torch.no_grad():
            if init == "SAMPLE_VOCAB":
                ids = torch.randint(0, word_embeddings.num_embeddings, (total,), device=word_embeddings.weight.device)
            elif init == "TEXT":
                ids = _init_text_ids(cfg, total).to(word_embeddings.weight.device)
            else:
                raise ConfigError(f"prompt_tuning_init must be RANDOM, SAMPLE_VOCAB or TEXT, got {init!r}")
            self.embedding.weight.copy_(word_embeddings(ids).float().to(self.embedding.weight.device))

    def prompt_embeddings(self) -> torch.Tensor:
        return self.embedding.weight


def _init_text_ids(cfg: PromptTuningConfig, total: int) -> torch.Tensor:
    if not cfg.prompt_tuning_init_text or not cfg.tokenizer_name_or_path:
        raise ConfigError(
            "prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path; set both, or use "
            "prompt_tuning_init='RANDOM'"
        )
    from transformers import AutoTokenizer

    kwargs = dict(cfg.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a config file must never run code
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path, **kwargs)
    ids = tokenizer(cfg.prompt_tuning_init_text)["input_ids"]
    # Repeat or cut the text's tokens to the number of virtual tokens, as PEFT does.
    ids = (ids * math.ceil(total / max(len(ids), 1)))[:total]
    return torch.tensor(ids, dtype=torch.long)


class PromptEncoder(nn.Module):
    """P-tuning's virtual tokens: an ``embedding`` [P, hidden] fed through ``mlp_head`` (MLP) or ``lstm_head``
    then ``mlp_head`` (LSTM), PEFT's ``PromptEncoder`` with the same parameter names, shapes and creation order.

    In inference mode (an adapter loaded from its checkpoint, which holds the encoder's output) there is no
    head: ``embedding`` holds the final virtual tokens, as in PEFT.
    """

    def __init__(self, cfg: PromptEncoderConfig):
        super().__init__()
        total = cfg.num_virtual_tokens * cfg.num_transformer_submodules
        dim, hidden = cfg.token_dim, cfg.encoder_hidden_size
        self.embedding = nn.Embedding(total, dim)
        self.kind = None if cfg.inference_mode else cfg.encoder_reparameterization_type
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=cfg.encoder_num_layers,
                                     dropout=cfg.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        elif self.kind == "MLP":
            if cfg.encoder_num_layers != 2:
                warnings.warn(f"for MLP, encoder_num_layers={cfg.encoder_num_layers} is ignored; exactly 2 MLP "
                              "layers are used (as in PEFT)")
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))
        elif self.kind is not None:
            raise ConfigError(f"encoder_reparameterization_type must be 'MLP' or 'LSTM', got {self.kind!r}")

    def prompt_embeddings(self) -> torch.Tensor:
        """[P * submodules, hidden]: the encoder's output, which PEFT feeds the model and saves as
        ``prompt_embeddings``."""
        w = self.embedding.weight
        if self.kind == "LSTM":  # the LSTM runs over the virtual tokens as one sequence
            return self.mlp_head(self.lstm_head(w.unsqueeze(0))[0])[0]
        if self.kind == "MLP":
            return self.mlp_head(w)
        return w


class PromptLearning(nn.Module):
    """All prompt-learning adapters of one model, attached as ``model.peftfast_prompt_learning``.

    Holds one encoder per adapter name, the active one, the on/off switch, and the hook handles.
    """

    def __init__(self, kind: type, backend: str):
        super().__init__()
        self.kind = kind
        self.backend = backend
        self.encoders = nn.ModuleDict()
        self.configs: dict = {}
        self.active_adapters: list = []
        self.disabled = False
        self.handles: list = []
        self.original_attention: Optional[str] = None

    @property
    def adapter_names(self) -> list:
        return list(self.encoders.keys())

    def set_active(self, names: list, trainable: bool = True) -> None:
        names = [n for n in names if n in self.encoders]
        if len(names) > 1:
            raise ValueError(f"prompt-learning adapters are used one at a time; got {names}. Pass a single name")
        self.active_adapters = names
        for name, enc in self.encoders.items():
            for p in enc.parameters():
                p.requires_grad_(trainable and name in names)

    def delete_adapter(self, name: str) -> None:
        if name in self.encoders:
            del self.encoders[name]
            self.configs.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def active(self):
        """(config, encoder) of the active adapter, or None when disabled or nothing is active."""
        if self.disabled or not self.active_adapters:
            return None
        name = self.active_adapters[0]
        return self.configs[name], self.encoders[name]


# --------------------------------------------------------------------------------------------------
# The cache that stands in for the prefix
# --------------------------------------------------------------------------------------------------


def _prefix_cache_class():
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class PrefixLayer(DynamicLayer):
        """One layer's real-token K/V; reports ``P`` more tokens than it stores (the prefix)."""

        def __init__(self, prefix_len: int):
            super().__init__()
            self.prefix_len = prefix_len
            # Models that compute attention themselves (Bloom, GPT-J, GPT-Neo) get the prefix the way PEFT
            # gives it: prepended to the K/V this cache returns. Set per forward; None on the fused path.
            self.prefix: Optional[tuple] = None

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            if self.prefix is None:
                return keys, values
            pk, pv = self.prefix  # [Hkv, P, D] -> [B, Hkv, P, D], batch stride 0 until the concatenation
            b = keys.shape[0]
            pk = pk.to(keys.dtype).unsqueeze(0).expand(b, -1, -1, -1)
            pv = pv.to(values.dtype).unsqueeze(0).expand(b, -1, -1, -1)
            return torch.cat([pk, keys], dim=-2), torch.cat([pv, values], dim=-2)

        def real_length(self) -> int:
            return DynamicLayer.get_seq_length(self)

        def get_seq_length(self) -> int:
            return self.prefix_len + self.real_length()

        # The inherited batch operations test get_seq_length() > 0, which is always true here.
        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.real_length() > 0:
                super().batch_repeat_interleave(repeats)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.real_length() > 0:
                super().batch_select_indices(indices)

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            if self.real_length() > 0:
                super().reorder_cache(beam_idx)

        def crop(self, max_length: int) -> None:
            if max_length < 0:
                super().crop(max_length)
            else:  # absolute length counted with the prefix
                super().crop(max_length - self.prefix_len) if max_length > self.prefix_len else self.reset()

    class PrefixCache(DynamicCache):
        """A DynamicCache whose every layer starts ``prefix_len`` tokens long without storing them."""

        def __init__(self, prefix_len: int, num_layers: int):
            super().__init__()
            self.layers = [PrefixLayer(prefix_len) for _ in range(num_layers)]
            self.layer_class_to_replicate = None
            self.prefix_len = prefix_len

        def real_length(self) -> int:
            return self.layers[0].real_length() if self.layers else 0

        def set_prefix(self, prefix: "PrefixKV") -> None:
            for i, layer in enumerate(self.layers):
                layer.prefix = prefix.layer(i)

    return PrefixCache


_PREFIX_CACHE = None


def prefix_cache_class():
    global _PREFIX_CACHE
    if _PREFIX_CACHE is None:
        _PREFIX_CACHE = _prefix_cache_class()
    return _PREFIX_CACHE


# --------------------------------------------------------------------------------------------------
# The attention function
# --------------------------------------------------------------------------------------------------


class PrefixKV:
    """The prefix of one forward: per layer ``(k, v)``, each [Hkv, P, D], views of one tensor."""

    def __init__(self, embeddings: torch.Tensor, num_layers: int, kv_heads: int, backend: str, mask_is_2d: bool):
        p = embeddings.shape[0]
        # [P, 2L * Hkv * D] -> [2L, Hkv, P, D]; layer i is rows 2i (keys) and 2i + 1 (values), as in PEFT.
        kv = embeddings.view(p, 2 * num_layers, kv_heads, -1).permute(1, 2, 0, 3)
        self.kv = kv
        self.prefix_len = p
        self.backend = backend
        self.mask_is_2d = mask_is_2d

    def layer(self, idx: int) -> tuple:
        return self.kv[2 * idx], self.kv[2 * idx + 1]

    def __repr__(self) -> str:  # shows up in transformers' kwargs logging; keep it short
        return f"PrefixKV(P={self.prefix_len}, layers={self.kv.shape[0] // 2})"


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
    from .kernels.dispatch import resolve_backend

    if resolve_backend(prefix.backend, query.device) != "triton" or not prefix.mask_is_2d:
        return None
    try:
        from .kernels import prefix_attention
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


def _register_attention(original: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = ATTN_PREFIX + original
    AttentionInterface.register(name, prefix_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _set_attention(model: nn.Module, name: str) -> list:
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


# --------------------------------------------------------------------------------------------------
# Config completion (PEFT's _prepare_prompt_learning_config, in our words)
# --------------------------------------------------------------------------------------------------


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ConfigError("prompt learning needs a transformers model (one with a .config)")
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _first(cfg, names: tuple):
    for n in names:
        value = getattr(cfg, n, None)
        if value is not None:
            return value
    return None


def complete_config(cfg, model: nn.Module) -> None:
    """Fill num_layers, token_dim, num_attention_heads (KV heads for prefix tuning, as PEFT does for
    grouped-query attention) and num_transformer_submodules from the model's config."""
    mc = _text_config(model)
    seq2seq = is_seq2seq(model)
    if seq2seq and cfg.task_type != "SEQ_2_SEQ_LM":
        raise ConfigError(
            f"{type(cfg).__name__} on an encoder-decoder model needs task_type='SEQ_2_SEQ_LM' (got "
            f"{cfg.task_type!r}); other task types on encoder-decoder models are not supported by peftfast yet"
        )
    if not seq2seq and cfg.task_type == "SEQ_2_SEQ_LM":
        raise ConfigError(
            f"task_type='SEQ_2_SEQ_LM' needs an encoder-decoder model (T5, BART, ...); this is "
            f"{type(model).__name__}: use task_type='CAUSAL_LM'"
        )
    if cfg.task_type not in SUPPORTED_TASKS:
        raise ConfigError(
            f"{type(cfg).__name__} with task_type={cfg.task_type!r} is not supported by peftfast yet; "
            f"use one of {[t for t in SUPPORTED_TASKS if t]}"
        )
    if cfg.task_type == "TOKEN_CLS" and isinstance(cfg, PROMPT_CONFIGS):
        raise ConfigError(
            f"{type(cfg).__name__} with task_type='TOKEN_CLS' is not supported: the classifier would label the virtual "
            "tokens too and the labels no longer line up (Hugging Face PEFT fails on it as well); use "
            "PrefixTuningConfig, which adds no tokens"
        )
    layers = _first(mc, ("num_hidden_layers", "num_layers", "n_layer"))
    hidden = _first(mc, ("hidden_size", "n_embd", "d_model"))
    heads = _first(mc, ("num_attention_heads", "n_head", "num_heads"))
    if None in (layers, hidden, heads):
        raise ConfigError("could not read the layer count, hidden size and head count from the model config")
    token_dim = hidden
    if isinstance(cfg, PrefixTuningConfig):
        # Grouped-query attention: the prefix is sized by the KV heads (as PEFT does since #1901).
        kv_heads = getattr(mc, "num_key_value_heads", None)
        if kv_heads is not None:
            head_dim = getattr(mc, "head_dim", None) or hidden // heads
            token_dim, heads = head_dim * kv_heads, kv_heads
    wanted = {"num_layers": layers, "token_dim": token_dim, "num_attention_heads": heads}
    if isinstance(cfg, PROMPT_CONFIGS):
        wanted.pop("num_attention_heads")  # unused by prompt tuning
    wrong = [f"{k}={getattr(cfg, k)} (the model needs {v})" for k, v in wanted.items()
             if getattr(cfg, k) is not None and getattr(cfg, k) != v]
    if wrong:
        raise ConfigError(
            f"{type(cfg).__name__} was made for another model: {', '.join(wrong)}; use an adapter trained on this "
            "base model, or leave these fields unset to size a new adapter from the model"
        )
    cfg.num_layers, cfg.token_dim = layers, token_dim
    if cfg.num_attention_heads is None:
        cfg.num_attention_heads = heads
    if cfg.num_transformer_submodules is None:
        cfg.num_transformer_submodules = 2 if cfg.task_type == "SEQ_2_SEQ_LM" else 1
    if isinstance(cfg, (PrefixTuningConfig, PromptEncoderConfig)) and cfg.encoder_hidden_size is None:
        cfg.encoder_hidden_size = cfg.token_dim


# --------------------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------------------


def prompt_learning_of(model: nn.Module) -> Optional[PromptLearning]:
    m = getattr(model, ENCODER_ATTR, None)
    return m if isinstance(m, PromptLearning) else None


def is_seq2seq(model: nn.Module) -> bool:
    """An encoder-decoder model (T5, BART, ...): prompt learning goes through its encoder / its cache."""
    return bool(getattr(_text_config(model), "is_encoder_decoder", False)) and hasattr(model, "get_encoder")


def prefix_attention_problem(model: nn.Module) -> Optional[str]:
    """Why prefix tuning cannot run on this model's attention (None when it can)."""
    original = getattr(_text_config(model), "_attn_implementation", None)
    if original not in SUPPORTED_ATTENTION:
        return (
            f"prefix tuning runs on the model's attention interface with attn_implementation='sdpa'; this model "
            f"uses {original!r}. Load it with attn_implementation='sdpa' (or call model.set_attn_implementation"
            "('sdpa')) before patching"
        )
    return None


def uses_attention_interface(model: nn.Module) -> bool:
    """Whether the model's attention layers call transformers' attention interface (so the prefix can
    travel as an argument to the fused kernel). Others (Bloom, GPT-J, GPT-Neo) compute attention
    themselves and get the prefix concatenated by the cache, as PEFT does (reference path)."""
    return bool(getattr(model, "_supports_attention_backend", False))


def check_prompt_learning(model: nn.Module, cfg) -> None:
    """Raise ConfigError when ``cfg`` cannot be added to ``model`` (completing ``cfg`` from the model's
    config on the way); the checks ``patch`` makes, usable on their own (peftfast.devtools.coverage)."""
    complete_config(cfg, model)
    if (isinstance(cfg, PrefixTuningConfig) and prompt_learning_of(model) is None and not is_seq2seq(model)
            and uses_attention_interface(model)):
        problem = prefix_attention_problem(model)
        if problem is not None:
            raise ConfigError(problem)


def add_prompt_learning(model: nn.Module, cfg, adapter_name: str, backend: str) -> list:
    """Add a prefix/prompt adapter; returns undo steps (in order of doing). Raises before changing
    anything when the model cannot take it."""
    check_prompt_learning(model, cfg)
    holder = prompt_learning_of(model)
    undo: list = []
    if holder is not None and holder.kind is not type(cfg):
        raise ConfigError(f"this model already carries {holder.kind.__name__} adapters; cannot add a {type(cfg).__name__}")
    if isinstance(cfg, PrefixTuningConfig):
        encoder = PrefixEncoder(cfg, projection=cfg.prefix_projection and not cfg.inference_mode)
    else:
        embeddings = model.get_input_embeddings()
        if cfg.token_dim != embeddings.weight.shape[-1]:
            raise ConfigError(f"token_dim={cfg.token_dim} but the model's input embeddings are {embeddings.weight.shape[-1]} wide")
        encoder = PromptEncoder(cfg) if isinstance(cfg, PromptEncoderConfig) else PromptEmbedding(cfg, embeddings)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    encoder.to(device)
    if holder is None:
        holder = PromptLearning(type(cfg), backend)
        model.add_module(ENCODER_ATTR, holder)
        undo.append(lambda: delattr(model, ENCODER_ATTR))
        seq2seq = is_seq2seq(model)
        if isinstance(cfg, PrefixTuningConfig) and not seq2seq and uses_attention_interface(model):
            holder.original_attention = getattr(_text_config(model), "_attn_implementation", None)
            name = _register_attention(holder.original_attention)
            undo.extend(_set_attention(model, name))
        if seq2seq:
            hooks = [(model, functools.partial(_seq2seq_hook, holder))]
            if isinstance(cfg, PROMPT_CONFIGS):
                # generate() runs the encoder by itself: the virtual tokens go in at the encoder
                hooks.append((model.get_encoder(), functools.partial(_encoder_prompt_hook, holder,
                                                                     model.get_input_embeddings())))
        else:
            hooks = [(model, _prefix_hook if isinstance(cfg, PrefixTuningConfig) else _prompt_hook)]
        for module, hook in hooks:
            handle = module.register_forward_pre_hook(hook, with_kwargs=True)
            holder.handles.append(handle)
            undo.append(handle.remove)
    holder.encoders[adapter_name] = encoder
    holder.configs[adapter_name] = cfg
    undo.append(lambda: holder.delete_adapter(adapter_name))
    return undo


def remove_prompt_learning(model: nn.Module) -> None:
    """Take every prompt-learning adapter out and restore the attention implementation."""
    holder = prompt_learning_of(model)
    if holder is None:
        return
    for handle in holder.handles:
        handle.remove()
    if holder.original_attention is not None:
        _set_attention(model, holder.original_attention)
    delattr(model, ENCODER_ATTR)


# --------------------------------------------------------------------------------------------------
# The forward hooks
# --------------------------------------------------------------------------------------------------


def _as_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
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


def _pop_cache(model: nn.Module, kw: dict) -> tuple:
    """Take the caller's cache out of ``kw``, under either name.

    Returns:
        (the cache or None, the name the model's forward takes it by, the name the caller used (for errors)).

    Example:
        >>> cache, key, _ = _pop_cache(model, kw)
        >>> kw[key] = cache
    """
    declared = _cache_kwarg(model)
    found, given = None, declared
    for key in CACHE_KWARGS:  # "cache" first: transformers prefers it when both are given
        value = kw.pop(key, None)
        if found is None and value is not None:
            found, given = value, key
    return found, declared, given


def _batch_and_length(kw: dict) -> tuple:
    x = kw.get("input_ids")
    if x is None:
        x = kw.get("inputs_embeds")
    if x is None:
        raise ValueError("the model was called with neither input_ids nor inputs_embeds")
    return x.shape[0], x.shape[1]


def _ones_before(mask: torch.Tensor, p: int) -> torch.Tensor:
    return torch.cat([torch.ones(mask.shape[0], p, dtype=mask.dtype, device=mask.device), mask], dim=1)


def _prefix_hook(model: nn.Module, args: tuple, kwargs: dict):
    holder = prompt_learning_of(model)
    active = holder.active() if holder is not None else None
    if active is None:
        return None
    cfg, encoder = active
    kw = _as_kwargs(model, args, kwargs)
    batch, n = _batch_and_length(kw)
    p = cfg.num_virtual_tokens
    cache_cls = prefix_cache_class()
    cache, cache_key, given = _pop_cache(model, kw)
    if cache is None or (not isinstance(cache, cache_cls) and _is_empty_cache(cache)):
        cache = cache_cls(p, cfg.num_layers)
    elif not isinstance(cache, cache_cls):
        raise ValueError(
            f"{given} holds tokens computed without the prefix; with prefix tuning pass no cache (or an empty "
            "one) and let the model build its own"
        )
    real = cache.real_length()
    kw[cache_key] = cache
    mask = kw.get("attention_mask")
    mask_is_2d = mask is None or mask.dim() == 2
    if mask is not None and mask.dim() == 2 and mask.shape[1] == real + n:
        kw["attention_mask"] = _ones_before(mask, p)
    # generate() counts real tokens only, other callers may already count the prefix: the model recounts
    # from its cache, which reports the P virtual tokens, so both agree without reading the tensor back.
    kw.pop("cache_position", None)
    if kw.get("position_ids") is not None:
        kw["position_ids"] = kw["position_ids"] + p  # PEFT shifts explicit positions past the prefix
    embeddings = encoder.prompt_embeddings()
    dtype = _model_dtype(model)
    if dtype is not None:
        embeddings = embeddings.to(dtype)
    prefix = PrefixKV(embeddings, cfg.num_layers, cfg.num_attention_heads, holder.backend, mask_is_2d)
    if uses_attention_interface(model):
        kw[PREFIX_KWARG] = prefix
        return (), kw
    if model.training and getattr(model, "is_gradient_checkpointing", False):
        raise ValueError(
            f"{type(model).__name__} computes attention itself, so the prefix reaches it only through the KV cache, "
            "which gradient checkpointing drops; disable gradient checkpointing for prefix tuning on this model "
            "(as PEFT requires), or use a model on transformers' attention interface"
        )
    cache.set_prefix(prefix)
    return (), kw


def _is_empty_cache(cache) -> bool:
    try:
        return cache.get_seq_length() == 0
    except Exception:  # pragma: no cover - an unknown cache type
        return False


def _model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _prompt_hook(model: nn.Module, args: tuple, kwargs: dict):
    holder = prompt_learning_of(model)
    active = holder.active() if holder is not None else None
    if active is None:
        return None
    cfg, encoder = active
    kw = _as_kwargs(model, args, kwargs)
    batch, n = _batch_and_length(kw)
    p = cfg.num_virtual_tokens * cfg.num_transformer_submodules
    cache, cache_key, _ = _pop_cache(model, kw)
    kw[cache_key] = cache
    prefill = cache is None or _is_empty_cache(cache)
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
        kw["attention_mask"] = _ones_before(mask, p)
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


# --------------------------------------------------------------------------------------------------
# Encoder-decoder models (SEQ_2_SEQ_LM), as PEFT's PeftModelForSeq2SeqLM
# --------------------------------------------------------------------------------------------------
#
# Prompt tuning: the first P of the 2P virtual tokens go before the encoder's input (PEFT trains and saves
# 2P, and uses P); the attention mask, which the decoder's cross-attention reuses, gets P ones in front.
# The decoder is untouched. The encoder hook does the prepending, so generate() (which calls the encoder
# itself) gets it too; the model hook extends the mask for the cross-attention.
#
# Prefix tuning: exactly PEFT's cache: an EncoderDecoderCache whose self-attention part holds the prefix
# (PEFT's layout: the [P, 2L*H*D] table doubled along the layer axis and cut in groups of four, so layer i
# reads key/value rows 4i, 4i+1 modulo 2L) and whose cross-attention part starts empty (PEFT discards the
# cross-attention prefix, since the encoder output changes). The encoder sees no prefix. A real cache
# (these models compute attention themselves), so the reference path; not under gradient checkpointing.


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


def _seq2seq_hook(holder: PromptLearning, model: nn.Module, args: tuple, kwargs: dict):
    active = holder.active()
    if active is None:
        return None
    cfg, encoder = active
    kw = _as_kwargs(model, args, kwargs)
    p = cfg.num_virtual_tokens
    if kw.get("position_ids") is not None:
        warnings.warn("position ids are ignored with prompt learning on encoder-decoder models (as in PEFT)")
        kw["position_ids"] = None
    if kw.get("token_type_ids") is not None:
        warnings.warn("token type ids are ignored with prompt learning on encoder-decoder models (as in PEFT)")
        kw["token_type_ids"] = None
    if isinstance(cfg, PrefixTuningConfig):
        cache, cache_key, _ = _pop_cache(model, kw)
        kw[cache_key] = cache
        if cache is None or _is_empty_cache(cache):
            batch = _seq2seq_batch(kw)
            if batch is None:
                raise ValueError("the model was called without inputs (input_ids, inputs_embeds or decoder inputs)")
            kw[cache_key] = _seq2seq_prefix_cache(cfg, encoder, batch, _model_dtype(model))
            dmask = kw.get("decoder_attention_mask")
            dec = kw.get("decoder_input_ids")
            if dec is None:
                dec = kw.get("decoder_inputs_embeds")
            if dmask is not None and dmask.dim() == 2 and (dec is None or dmask.shape[1] == dec.shape[1]):
                kw["decoder_attention_mask"] = _ones_before(dmask, p)
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
                kw["attention_mask"] = _ones_before(mask, p)
        elif enc[0].shape[1] == mask.shape[1] + p:  # encoder output computed with the virtual tokens (generate)
            kw["attention_mask"] = _ones_before(mask, p)
    return (), kw


def _encoder_prompt_hook(holder: PromptLearning, embeddings: nn.Module, encoder_module: nn.Module, args: tuple,
                         kwargs: dict):
    active = holder.active()
    if active is None:
        return None
    cfg, encoder = active
    kw = _as_kwargs(encoder_module, args, kwargs)
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
        kw["attention_mask"] = _ones_before(mask, p)
    return (), kw
