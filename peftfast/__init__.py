"""peftfast: parameter-efficient fine-tuning with fused Triton kernels, a drop-in for Hugging Face PEFT.

Example:
    >>> import peftfast
    >>> peftfast.patch(model, peftfast.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))  # doctest: +SKIP
    >>> peftfast.save_adapter(model, "out/")  # doctest: +SKIP
"""
from .checkpoint import AdapterLoadError, adapter_state_dict, load_adapter, save_adapter
from .config import (
    ConfigError, IA3Config, LoftQConfig, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
    as_config,
)
from .lora_init import replace_lora_weights_loftq
from .optim import create_loraplus_optimizer
from .patching import (
    adapter_config,
    disable_adapters,
    merge,
    patch,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    unmerge,
    unpatch,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError", "ConfigError", "IA3Config", "LoftQConfig", "LoraConfig", "PrefixTuningConfig",
    "PromptEncoderConfig", "PromptTuningConfig", "adapter_config", "adapter_state_dict", "as_config",
    "create_loraplus_optimizer", "disable_adapters", "load_adapter", "merge", "patch", "print_trainable_parameters",
    "replace_lora_weights_loftq", "save_adapter", "set_adapter", "trainable_parameters", "unmerge", "unpatch",
]
