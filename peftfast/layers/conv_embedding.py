"""LoRA on ``nn.Embedding`` and on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (reference path, PEFT's layout).

* Embedding: ``y = E[x] + scaling * A^T[x] @ B^T`` with ``lora_embedding_A`` [r, num_embeddings] and
  ``lora_embedding_B`` [dim, r] (parameters, not modules: PEFT's keys ``...lora_embedding_A``). A
  starts at zero and B normal, the reverse of linear LoRA, so the lookup of A is what learns first.
  A scaled embedding (transformers' ``Gemma3TextScaledWordEmbedding`` returns ``E[x] * embed_scale``)
  scales the LoRA term by the same scalar, so ``y = s * (E + dW)[x]``: what the merged weight gives.
* Convolution: ``lora_A`` is a conv like the base (same kernel, stride and padding, r output
  channels), ``lora_B`` a 1x1 conv to the output channels; ``y = conv(x) + scaling * B(A(dropout(x)))``.
* DoRA (``use_dora=True``) on both, as PEFT: a magnitude ``m`` (``lora_magnitude_vector``) rescales the
  adapted weight ``W' = W + scaling * dW`` to ``m * W' / ||W'||``. The norm is taken per *embedding
  dimension* for an embedding (over the vocabulary: ``W'`` [num_embeddings, dim] by column, ``m`` [dim])
  and per *output channel* for a convolution (over input channels and kernel: ``m`` [1, out, 1, ...],
  PEFT's shape). The norm is detached (DoRA paper, section 4.3), so it scales but takes no gradient.

These layers are small next to the linear projections (patch embeddings, token embeddings, UNet
convs), so they run as PyTorch ops; the fused kernels are for the linear layers.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError
from .base_weight import is_zero3_partitioned
from .linear import AdapterLayer, _Magnitude, adapter_dtype, init_lora_factors

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_whole(weight: torch.Tensor) -> None:
    """DoRA's norm needs the whole base weight, which a ZeRO-3 shard outside its module's forward is not."""
    if is_zero3_partitioned(weight):
        raise NotImplementedError("DoRA under DeepSpeed ZeRO-3 is not supported by peftfast (the weight norm needs "
                                  "the whole base weight); use ZeRO-2, FSDP2, or LoRA without use_dora")


def embed_scale_of(base: nn.Module) -> Optional[torch.Tensor]:
    """The scalar a scaled embedding multiplies its lookups by, or None for a plain embedding.

    Some embeddings (transformers' ``Gemma3TextScaledWordEmbedding``) return ``E[x] * embed_scale``. An
    adapter's rows must be scaled alike, or the unmerged adapter and its merge (which goes through the
    base's scaling) disagree. PEFT's reading is kept, so outputs match it: a Python number becomes a
    tensor of the weight's dtype, a one-element tensor is used as it is.

    Args:
        base: the embedding (or any layer with a ``weight``) the adapter wraps.

    Returns:
        A one-element tensor, or None when ``base`` has no ``embed_scale``.

    Raises:
        ConfigError: ``embed_scale`` is neither a number nor a one-element tensor (PEFT only warns and
            leaves the adapter unscaled, which mismatches the base rows).

    Example:
        >>> embed_scale_of(nn.Embedding(4, 2)) is None
        True
    """
    scale = getattr(base, "embed_scale", None)
    if scale is None:
        return None
    if isinstance(scale, (int, float)):
        return torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
    if torch.is_tensor(scale) and scale.numel() == 1:
        return scale
    shape = tuple(scale.shape) if torch.is_tensor(scale) else type(scale).__name__
    raise ConfigError(
        f"{type(base).__name__}.embed_scale is {shape}, not a scalar: peftfast scales an adapter's rows by a "
        "scalar embed_scale only, as the base scales its lookups; exclude this layer from target_modules / "
        "trainable_token_indices, or make embed_scale a number"
    )


def is_lora_extra(module: nn.Module) -> bool:
    """Layers LoRA wraps besides the linear ones (nn.MultiheadAttention: see peftfast.layers.mha)."""
    return isinstance(module, (nn.Embedding, nn.MultiheadAttention) + CONV_TYPES)


class LoraEmbedding(AdapterLayer):
    """LoRA over an ``nn.Embedding``."""

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Embedding, backend: str = "auto"):
        super().__init__(base_layer, backend)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict = {}
        self.lora_alpha: dict = {}
        self.scaling: dict = {}
        self._dora_norm_cache: dict = {}  # adapter -> the norm a merge used (unmerge divides by it again)

    @property
    def adapter_names(self) -> list:
        return list(self.lora_embedding_A.keys())

    def add_adapter(self, name: str, r: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
                    use_dora: bool = False, init: object = True, lora_bias: bool = False) -> None:
        if lora_bias:
            raise ConfigError(
                "lora_bias=True is not supported on nn.Embedding (PEFT refuses it too); set lora_bias=False or leave "
                "embeddings out of target_modules"
            )
        base = self.base_layer
        embed_scale_of(base)  # refuse an embed_scale that cannot be applied before anything is added
        kw = dict(device=base.weight.device, dtype=adapter_dtype(base))
        a = torch.randn(r, base.num_embeddings, **kw)
        b = torch.randn(base.embedding_dim, r, **kw)
        if init is not False:  # PEFT: A zero, B normal for every truthy init
            nn.init.zeros_(a)
            nn.init.normal_(b)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        if use_dora:
            mag = _Magnitude(base.embedding_dim, **kw)
            with torch.no_grad():
                mag.weight.copy_(self._weight_norm(name, base.weight))
            self.lora_magnitude_vector[name] = mag

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for d in (self.r, self.lora_alpha, self.scaling, self._dora_norm_cache):
            d.pop(name, None)

    def _weight_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's ``||W + dW||`` per embedding dimension (over the vocabulary), [dim] fp32, no gradient."""
        _check_whole(weight)
        with torch.no_grad():
            return torch.linalg.norm(weight.float() + self.delta_weight(name), dim=0)

    def _lookup(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq,
                           base.sparse)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._use_base_only():
            return self._base_forward(x)
        result = self.base_layer(x)  # a scaled embedding's lookup comes scaled already
        scale = embed_scale_of(self.base_layer)
        for name in self.active_adapters:
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            # [..., r] @ [r, dim] -> [..., dim]
            term = (self._lookup(x, a.t()) @ b.t()) * self.scaling[name]
            if name in self.lora_magnitude_vector:
                # m / ||W + dW|| per dimension scales the base row and the LoRA term alike (PEFT's order);
                # the norm is of the unscaled weight, embed_scale multiplies the term after it (as PEFT)
                factor = self.lora_magnitude_vector[name].weight / self._weight_norm(name, self.base_layer.weight)
                result, term = factor * result, factor * term
            if scale is not None:
                term = term * scale.to(term.dtype)
            result = result + term
        return result.to(self.base_layer.weight.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """[num_embeddings, dim] fp32."""
        return (self.lora_embedding_B[name].float() @ self.lora_embedding_A[name].float()).t() * self.scaling[name]

    def merge(self, names: Optional[list] = None) -> None:
        names = [n for n in (names or self.active_adapters) if n not in self.merged_adapters and n in self.r]
        with torch.no_grad():
            w = self.base_layer.weight
            unmerged = w.float().clone()  # DoRA's norm is the forward's: of the weight before this merge
            for name in names:
                merged = w.float() + self.delta_weight(name)
                if name in self.lora_magnitude_vector:
                    norm = self._weight_norm(name, unmerged)
                    self._dora_norm_cache[name] = norm
                    merged = (self.lora_magnitude_vector[name].weight.float() / norm).view(1, -1) * merged
                w.copy_(merged.to(w.dtype))
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            w = self.base_layer.weight
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight = w.float()
                if name in self.lora_magnitude_vector:
                    factor = self.lora_magnitude_vector[name].weight.float() / self._dora_norm_cache.pop(name)
                    weight = weight / factor.view(1, -1)
                w.copy_((weight - self.delta_weight(name)).to(w.dtype))


class LoraConv(AdapterLayer):
    """LoRA over an ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``, grouped ones included.

    With ``groups > 1`` PEFT's layout is kept: A is an ungrouped conv to r channels and B a grouped 1x1
    conv (r divisible by groups). Their product mixes every input channel into every group, which a
    grouped base kernel cannot hold, so such an adapter trains and saves but does not merge (as in PEFT).
    """

    adapter_param_names = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, backend: str = "auto"):
        super().__init__(base_layer, backend)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict = {}
        self.lora_alpha: dict = {}
        self.scaling: dict = {}
        self.lora_dropout_p: dict = {}
        self._dora_norm_cache: dict = {}  # adapter -> the norm a merge used (unmerge divides by it again)

    @property
    def adapter_names(self) -> list:
        return list(self.lora_A.keys())

    def add_adapter(self, name: str, r: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False,
                    use_dora: bool = False, init: object = True, lora_bias: bool = False) -> None:
        base = self.base_layer
        if use_dora and base.groups > 1:
            # PEFT accepts this, but its norm reshapes B @ A ([out / groups, in * k]) into the grouped
            # kernel's shape, so the magnitude it learns scales a mis-laid-out weight
            raise ConfigError(
                f"DoRA on a {type(base).__name__} with groups={base.groups} is not supported by peftfast: PEFT's "
                "weight norm for it lays the LoRA product out wrongly, so no correct result can match it; use "
                "use_dora=False for this layer or exclude it from target_modules"
            )
        if r % base.groups:
            raise ConfigError(
                f"LoRA on a {type(base).__name__} with groups={base.groups} needs a rank divisible by the groups "
                f"(PEFT's rule), got r={r}; choose r as a multiple of {base.groups} (rank_pattern can set it for "
                "this layer alone) or exclude the layer from target_modules"
            )
        conv = type(base)
        kw = dict(device=base.weight.device, dtype=adapter_dtype(base))
        ones = (1,) * (base.weight.dim() - 2)
        # PEFT's layout: A repeats the base's kernel, stride and padding (not its dilation); B is 1x1.
        a = conv(self.in_features, r, base.kernel_size, base.stride, base.padding, bias=False, **kw)
        # lora_bias: B's bias, scaled with B's output (PEFT's layout); merging adds it to the base bias.
        b = conv(r, self.out_features, ones, ones, groups=base.groups, bias=bool(lora_bias), **kw)
        init_lora_factors(a, b, init, r)
        self.lora_A[name], self.lora_B[name] = a, b
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout_p[name] = float(dropout)
        if use_dora:
            # PEFT's shape [1, out, 1, ...]: it broadcasts over the [batch, out, *spatial] output
            mag = _Magnitude((1, self.out_features) + ones, **kw)
            with torch.no_grad():
                mag.weight.copy_(self._weight_norm(name, base.weight))
            self.lora_magnitude_vector[name] = mag

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        for d in (self.r, self.lora_alpha, self.scaling, self.lora_dropout_p, self._dora_norm_cache):
            d.pop(name, None)

    def _weight_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """DoRA's ``||W + dW||`` per output channel, [1, out, 1, ...] fp32, no gradient."""
        _check_whole(weight)
        with torch.no_grad():
            w = weight.float() + self.delta_weight(name)
            return w.flatten(1).norm(dim=1).view((1, -1) + (1,) * (w.dim() - 2))

    def _dora_term(self, name: str, x: torch.Tensor, h: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to ``result`` (the base output): ``(f - 1) * conv(h, W) + f * s * B(A(h))``,
        ``f = m / ||W + dW||``. Without dropout ``conv(h, W)`` is ``result`` less the bias; with it PEFT
        recomputes the base on the dropped-out input, and so does this."""
        base = self.base_layer
        a, b = self.lora_A[name], self.lora_B[name]
        factor = self.lora_magnitude_vector[name].weight / self._weight_norm(name, base.weight)
        if h is x:
            plain = result if base.bias is None else result - base.bias.view((1, -1) + (1,) * (result.dim() - 2))
        else:
            plain = base._conv_forward(h.to(base.weight.dtype), base.weight, None)
        return (factor - 1) * plain + factor * b(a(h.to(a.weight.dtype))) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._use_base_only():
            return self._base_forward(x)
        result = self.base_layer(x)
        for name in self.active_adapters:
            a, b = self.lora_A[name], self.lora_B[name]
            p = self.lora_dropout_p[name]
            h = F.dropout(x, p, self.training) if p and self.training else x
            if name in self.lora_magnitude_vector:
                result = result + self._dora_term(name, x, h, result)
            else:
                result = result + b(a(h.to(a.weight.dtype))) * self.scaling[name]
        return result.to(x.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The change of the base kernel, [out, in, *kernel] fp32 (ungrouped bases only)."""
        a = self.lora_A[name].weight.float()  # [r, in, *k]
        b = self.lora_B[name].weight.float()  # [out, r, *1]
        # B(A(x)) with a 1x1 B is a conv with kernel sum_r B[o, r] * A[r, i, *k].
        return torch.einsum("or,ri...->oi...", b.flatten(1), a) * self.scaling[name]

    def _merge_bias(self, name: str, sign: float) -> None:
        lora_b = self.lora_B[name].bias
        if lora_b is not None:
            bias = self.base_layer.bias
            bias.copy_((bias.float() + sign * self.scaling[name] * lora_b.float()).to(bias.dtype))

    def merge(self, names: Optional[list] = None) -> None:
        names = [n for n in (names or self.active_adapters) if n not in self.merged_adapters and n in self.r]
        if names and self.base_layer.groups > 1:
            raise ConfigError(
                f"cannot merge LoRA into a {type(self.base_layer).__name__} with groups={self.base_layer.groups}: the "
                "adapter's product spans all input channels, which a grouped kernel cannot hold (PEFT does not merge "
                "it either); keep the adapter unmerged"
            )
        if self.base_layer.bias is None and any(self.lora_B[n].bias is not None for n in names):
            raise ConfigError(
                "cannot merge a LoRA adapter with lora_bias=True into a convolution without a bias (as in PEFT); "
                "keep it unmerged, or train it with lora_bias=False"
            )
        with torch.no_grad():
            w = self.base_layer.weight
            unmerged = w.float().clone()  # DoRA's norm is the forward's: of the weight before this merge
            view = (-1,) + (1,) * (w.dim() - 1)
            for name in names:
                merged = w.float() + self.delta_weight(name)
                if name in self.lora_magnitude_vector:
                    norm = self._weight_norm(name, unmerged)
                    self._dora_norm_cache[name] = norm
                    merged = (self.lora_magnitude_vector[name].weight.float() / norm).view(view) * merged
                w.copy_(merged.to(w.dtype))
                self._merge_bias(name, 1.0)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        with torch.no_grad():
            w = self.base_layer.weight
            view = (-1,) + (1,) * (w.dim() - 1)
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight = w.float()
                if name in self.lora_magnitude_vector:
                    factor = self.lora_magnitude_vector[name].weight.float() / self._dora_norm_cache.pop(name)
                    weight = weight / factor.view(view)
                w.copy_((weight - self.delta_weight(name)).to(w.dtype))
                self._merge_bias(name, -1.0)
