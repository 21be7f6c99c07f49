"""The prompt-learning parameters, with Hugging Face PEFT's names, shapes and creation order, and the module
that carries them on the model (``model.peftfast_prompt_learning``).

* :class:`PrefixEncoder`: prefix tuning's key/value table, optionally through PEFT's tanh MLP.
* :class:`PromptEmbedding`: prompt tuning's virtual-token embeddings.
* :class:`PromptEncoder`: P-tuning's embeddings fed through an MLP or LSTM head.

Each has ``prompt_embeddings()``, the tensor PEFT feeds the model and saves as ``prompt_embeddings``.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn

from ..config import ConfigError, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

# The attribute of the model that holds its PromptLearning module (and names its state-dict keys).
ENCODER_ATTR = "peftfast_prompt_learning"


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
            raise ConfigError(f"prompt-learning adapters are used one at a time; got {names}. Pass a single name")
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


def prompt_learning_of(model: nn.Module) -> Optional[PromptLearning]:
    m = getattr(model, ENCODER_ATTR, None)
    return m if isinstance(m, PromptLearning) else None
