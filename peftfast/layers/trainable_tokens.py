"""``trainable_token_indices``: train only some rows of an embedding (new or rare tokens), as PEFT does.

Each adapter holds ``trainable_tokens_delta`` [n, dim], the *values* of its rows (PEFT's name, although
they are not a difference), starting at the base's rows. A lookup returns those values for the chosen
token ids and the frozen base row for every other id. PEFT rebuilds the whole embedding matrix with
``index_copy`` on every call; here the base lookup runs as it is and only the positions holding a chosen
id are replaced, so a step costs O(tokens x dim) beyond the base, not a copy of a vocabulary-sized table.

A tied output head (``lm_head.weight is embed_tokens.weight``) is wrapped too, sharing the same
parameters, so the chosen rows change in both (PEFT's weight-tying rule); the file holds them once, under
the embedding: ``base_model.model.<path>.token_adapter.trainable_tokens_delta``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint_keys import TOKENS_PARAM
from ..config import ConfigError
from .conv_embedding import embed_scale_of
from .linear import AdapterLayer


class TrainableTokensLayer(AdapterLayer):
    """Chosen rows of an ``nn.Embedding`` (or of an ``nn.Linear`` head tied to one) train; the rest stay frozen.

    Args:
        base_layer: the embedding, or the linear output head whose weight rows are the vocabulary.
        tied_to: a layer over the same weight whose parameters this one shares (a tied LM head).

    Example:
        >>> layer = TrainableTokensLayer(nn.Embedding(100, 16))
        >>> layer.add_adapter("default", [3, 7])
        >>> layer.set_active(["default"])
        >>> tuple(layer(torch.tensor([[3, 4]])).shape)
        (1, 2, 16)
    """

    adapter_param_names = (TOKENS_PARAM,)

    def __init__(self, base_layer: nn.Module, backend: str = "auto", tied_to: Optional["TrainableTokensLayer"] = None):
        if not isinstance(base_layer, (nn.Embedding, nn.Linear)):
            raise ConfigError(
                f"trainable_token_indices needs an nn.Embedding (or a linear head tied to one), got a "
                f"{type(base_layer).__name__}; name an embedding layer in trainable_token_indices"
            )
        super().__init__(base_layer, backend)
        self.tied_to = [tied_to] if tied_to is not None else []  # a list: not registered as a submodule
        if tied_to is not None:
            self.trainable_tokens_delta = tied_to.trainable_tokens_delta
            self.token_indices = tied_to.token_indices
        else:
            self.trainable_tokens_delta = nn.ParameterDict()
            self.token_indices: dict = {}
        self._merged_originals: dict = {}

    @property
    def adapter_names(self) -> list:
        return list(self.trainable_tokens_delta.keys())

    def _rows(self) -> int:
        w = self.base_layer.weight
        return int(w.shape[0])

    def add_adapter(self, name: str, indices) -> None:
        """Start adapter ``name`` with the base's values of rows ``indices`` (a no-op until trained)."""
        if self.tied_to:
            return  # the tied layer's parameters are this layer's
        rows = self._rows()
        if isinstance(self.base_layer, nn.Embedding):
            embed_scale_of(self.base_layer)  # refuse an embed_scale that cannot be applied, before adding
        if not isinstance(indices, (list, tuple)) or not indices or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices
        ):
            raise ConfigError(f"trainable_token_indices must be a non-empty list of token ids, got {indices!r}")
        bad = [i for i in indices if not 0 <= i < rows]
        if bad or len(set(indices)) != len(indices):
            raise ConfigError(
                f"trainable_token_indices {list(indices)} must be distinct token ids in [0, {rows}) for this "
                f"{type(self.base_layer).__name__} ({'out of range: ' + str(bad) if bad else 'repeated ids'})"
            )
        for other, taken in self.token_indices.items():
            if set(taken) & set(indices):
                raise ConfigError(
                    f"adapter {name!r} trains token ids {sorted(set(taken) & set(indices))} that adapter {other!r} "
                    "trains already on this layer; PEFT allows only disjoint token indices"
                )
        w = self.base_layer.weight
        values = w.detach()[torch.tensor(indices, device=w.device)].clone()
        self.trainable_tokens_delta[name] = nn.Parameter(values)
        self.token_indices[name] = list(indices)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.token_indices.pop(name, None)

    def _index(self, name: str, device) -> torch.Tensor:
        return torch.tensor(self.token_indices[name], device=device)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._use_base_only():
            return self._base_forward(x)
        result = self.base_layer(x)
        for name in self.active_adapters:
            values = self.trainable_tokens_delta[name]
            idx = self._index(name, values.device)
            if isinstance(self.base_layer, nn.Embedding):
                result = self._embed(x, result, name, values, idx)
            else:
                # the head's logits for the chosen ids: x @ values^T (+ their bias)
                logits = F.linear(x.to(values.dtype), values)  # [..., D] @ [D, n] -> [..., n]
                bias = self.base_layer.bias
                if bias is not None:
                    logits = logits + bias[idx].to(logits.dtype)
                result = result.index_copy(result.dim() - 1, idx, logits.to(result.dtype))
        return result

    def _embed(self, x: torch.Tensor, result: torch.Tensor, name: str, values: torch.Tensor,
               idx: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        # slot[token id] = its row in ``values``, or -1 for a frozen id
        slot = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=x.device)
        slot[idx.to(x.device)] = torch.arange(idx.numel(), device=x.device)
        pos = slot[x]
        chosen = pos >= 0
        if base.padding_idx is not None and base.padding_idx in self.token_indices[name]:
            # F.embedding gives the padding row no gradient; PEFT's lookup of its rebuilt table keeps that
            pad_row = idx == base.padding_idx
            values = torch.where(pad_row[:, None], values.detach(), values)
        picked = F.embedding(pos.clamp(min=0), values)
        scale = embed_scale_of(base)  # scaled embeddings (Gemma 3) scale the chosen rows as the others
        if scale is not None:
            picked = picked * scale.to(picked.dtype)
        return torch.where(chosen[..., None], picked.to(result.dtype), result)

    def merge(self, names: Optional[list] = None) -> None:
        names = [n for n in (names or self.active_adapters) if n not in self.merged_adapters and n in self.token_indices]
        if self.tied_to:  # one weight under two layers: the embedding's merge writes it
            self.merged_adapters.extend(names)
            return
        with torch.no_grad():
            w = self.base_layer.weight
            for name in names:
                idx = self._index(name, w.device)
                self._merged_originals[name] = w[idx].clone()
                w.index_copy_(0, idx, self.trainable_tokens_delta[name].to(w.dtype))
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if self.tied_to:
            self.merged_adapters.clear()
            return
        with torch.no_grad():
            w = self.base_layer.weight
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                w.index_copy_(0, self._index(name, w.device), self._merged_originals.pop(name))

    def extra_repr(self) -> str:
        return f"token_indices={self.token_indices}, tied={bool(self.tied_to)}"
