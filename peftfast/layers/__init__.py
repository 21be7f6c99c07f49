"""The layer wrappers: thin nn.Modules that take a target layer's place and call one kernels op each.

``patch`` replaces each target with one of these, keeping the original as ``base_layer`` (``unpatch``
puts it back untouched), with the attribute names Hugging Face PEFT uses so that state-dict keys map one
to one onto PEFT's checkpoints. :mod:`.linear` holds the fused path (LoRA, DoRA, IA3 on ``nn.Linear``,
transformers' ``Conv1D`` and bitsandbytes bases) and the ``AdapterLayer`` base they all share;
:mod:`.base_weight` is the one way a wrapper reads (and a merge writes) its base weight, whatever the
base is (dense, 4-bit in any bitsandbytes state, 8-bit, an FSDP/ZeRO shard); the other modules wrap the
layer types PEFT also adapts, on the PyTorch reference path: :mod:`.conv_embedding` (LoRA/DoRA on
embeddings and convolutions), :mod:`.ia3_conv`, :mod:`.mha` (``nn.MultiheadAttention``), :mod:`.params`
(``target_parameters``: raw parameters such as MoE expert stacks) and :mod:`.trainable_tokens`.
"""
from .linear import AdapterLayer, IA3Layer, LoraLayer, ModulesToSave, adapter_dtype, is_linear_like

__all__ = ["AdapterLayer", "IA3Layer", "LoraLayer", "ModulesToSave", "adapter_dtype", "is_linear_like"]
