"""Adding prompt-learning adapters to a model and taking them out: the encoder module, the forward hooks and,
for prefix tuning on transformers' attention interface, the switched attention implementation."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from ..config import ConfigError, PrefixTuningConfig, PromptEncoderConfig
from .attention import prefix_attention_problem, register_attention, set_attention
from .encoders import ENCODER_ATTR, PrefixEncoder, PromptEmbedding, PromptEncoder, PromptLearning, prompt_learning_of
from .hooks import prefix_hook, prompt_hook
from .model_config import PROMPT_CONFIGS, complete_config, is_seq2seq, text_config, uses_attention_interface
from .seq2seq import encoder_prompt_hook, seq2seq_hook


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
            holder.original_attention = getattr(text_config(model), "_attn_implementation", None)
            name = register_attention(holder.original_attention)
            undo.extend(set_attention(model, name))
        if seq2seq:
            hooks = [(model, functools.partial(seq2seq_hook, holder))]
            if isinstance(cfg, PROMPT_CONFIGS):
                # generate() runs the encoder by itself: the virtual tokens go in at the encoder
                hooks.append((model.get_encoder(), functools.partial(encoder_prompt_hook, holder,
                                                                     model.get_input_embeddings())))
        else:
            hooks = [(model, prefix_hook if isinstance(cfg, PrefixTuningConfig) else prompt_hook)]
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
        set_attention(model, holder.original_attention)
    delattr(model, ENCODER_ATTR)
