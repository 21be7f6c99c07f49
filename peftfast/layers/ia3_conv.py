"""IA3 on ``nn.Conv2d`` / ``nn.Conv3d`` (reference path, PEFT's layout and semantics).

``ia3_l`` is ``[1, C, 1, 1]`` (``[1, C, 1, 1, 1]`` for Conv3d), broadcast over the channel axis of the
activations:

* feed-forward layers scale the *input* channels, ``C = in_channels``: ``y = conv(x * l)``;
* the others scale the *output* channels, bias included, ``C = out_channels``: ``y = conv(x) * l``.

``fan_in_fan_out`` means nothing for a convolution (PEFT stores it and never reads it here). PEFT has no
IA3 for ``nn.Conv1d`` (only Linear, Conv1D, Conv2d, Conv3d), so neither does peftfast.

These layers are small next to the linear projections, so they run as PyTorch ops; the fused IA3
kernel is for the linear layers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .linear import IA3Layer, adapter_dtype

IA3_CONV_TYPES = (nn.Conv2d, nn.Conv3d)


def is_ia3_extra(module: nn.Module) -> bool:
    """Layers IA3 wraps besides the linear ones (PEFT's set: Conv2d and Conv3d, not Conv1d)."""
    return isinstance(module, IA3_CONV_TYPES)


class IA3Conv(IA3Layer):
    """IA3 over an ``nn.Conv2d`` / ``nn.Conv3d``, grouped ones included.

    Args:
        base_layer: the convolution to adapt.
        feedforward: scale its input channels (True) or its output channels (False).
        backend: kept for symmetry with the linear wrappers; convolutions always run as PyTorch ops.

    Example:
        >>> layer = IA3Conv(nn.Conv2d(3, 8, 3), feedforward=False)
        >>> layer.add_adapter("default"); layer.set_active(["default"])
        >>> tuple(layer.ia3_l["default"].shape)
        (1, 8, 1, 1)
    """

    def add_adapter(self, name: str, init: bool = True) -> None:
        base = self.base_layer
        channels = self.in_features if self.is_feedforward else self.out_features
        shape = (1, channels) + (1,) * (base.weight.dim() - 2)
        value = torch.ones(shape) if init else torch.randn(shape)
        self.ia3_l[name] = nn.Parameter(value.to(device=base.weight.device, dtype=adapter_dtype(base)))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._use_base_only():
            return self._base_forward(x)
        scale = self._scale()
        base = self.base_layer
        if self.is_feedforward:
            # as PEFT: scale in the adapter's dtype, then hand the base its own dtype
            out = base((x.to(scale.dtype) * scale).to(base.weight.dtype))
        else:
            out = base(x).to(scale.dtype) * scale
        return out.to(x.dtype)

    def _weight_scale(self, l: torch.Tensor) -> torch.Tensor:
        """``l`` laid out to multiply the kernel ``[out, in / groups, *k]``."""
        if not self.is_feedforward:
            return l.transpose(0, 1)  # [out, 1, *1]
        base = self.base_layer
        if base.groups == 1:
            return l  # [1, in, *1]
        # a grouped kernel holds in/groups input channels per output channel: output channel o reads
        # input channels (o // out_per_group) * in_per_group + j, so repeat each group's slice of l
        g, ipg, opg = base.groups, base.in_channels // base.groups, base.out_channels // base.groups
        ones = l.shape[2:]
        return l.reshape(g, 1, ipg, *ones).expand(g, opg, ipg, *ones).reshape(base.out_channels, ipg, *ones)

    def _apply(self, names: list, invert: bool) -> None:
        base = self.base_layer
        with torch.no_grad():
            for name in names:
                l = self.ia3_l[name].float()
                if invert:
                    l = l + 1e-8  # PEFT divides by l + 1e-8
                w = base.weight
                factor = self._weight_scale(l)
                w.copy_((w.float() / factor if invert else w.float() * factor).to(w.dtype))
                if base.bias is not None and not self.is_feedforward:
                    b = base.bias
                    b.copy_((b.float() / l.flatten() if invert else b.float() * l.flatten()).to(b.dtype))

    def merge(self, names: Optional[list] = None) -> None:
        names = [n for n in (names or self.active_adapters) if n not in self.merged_adapters and n in self.ia3_l]
        self._apply(names, invert=False)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        names = list(reversed(self.merged_adapters))
        self._apply(names, invert=True)
        self.merged_adapters.clear()
