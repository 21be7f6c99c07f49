"""peftfast.kernels: pure tensor functions, each with its PyTorch reference beside it.

Nothing here knows about nn.Module or transformers; wrappers in ``peftfast`` call one function per op.
Each op's front module (``lora``, ``ia3``, ``dora``, ``prefix_attention``, ``nf4``) imports no Triton:
its kernels live in ``<op>_triton`` and are loaded through ``dispatch.triton_module`` when Triton imports.
"""
from .dispatch import BACKENDS, interpreting, resolve_backend
from .nf4 import Quant4bit, dequantize_4bit, dequantize_4bit_reference, is_4bit_weight, quant4bit_view

__all__ = [
    "BACKENDS",
    "Quant4bit",
    "dequantize_4bit",
    "dequantize_4bit_reference",
    "interpreting",
    "is_4bit_weight",
    "quant4bit_view",
    "resolve_backend",
]

from .dora import dora_linear, dora_linear_reference, dora_weight_norm  # noqa: E402
from .ia3 import ia3_linear, ia3_linear_reference  # noqa: E402
from .lora import lora_linear, lora_linear_reference  # noqa: E402

__all__ += [
    "dora_linear", "dora_linear_reference", "dora_weight_norm", "ia3_linear", "ia3_linear_reference",
    "lora_linear", "lora_linear_reference",
]

from .prefix_attention import prefix_attention, prefix_attention_reference  # noqa: E402

__all__ += ["prefix_attention", "prefix_attention_reference"]
