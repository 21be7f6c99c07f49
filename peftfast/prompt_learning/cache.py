"""The prefix of one forward (:class:`PrefixKV`) and the KV cache that stands in for it (:func:`prefix_cache_class`).

The cache *reports* ``P`` extra past tokens without storing them, so the model itself computes positions (RoPE,
learned or OPT's mask-based ones) and the ``[B, 1, N, P+N]`` mask exactly as with the cache PEFT feeds; it
stores only real tokens (generation). Models that compute attention themselves get the prefix prepended to the
K/V it returns, as PEFT gives it.
"""
from __future__ import annotations

from typing import Optional

import torch


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
