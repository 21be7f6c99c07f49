"""Prefix tuning, prompt tuning and P-tuning: virtual tokens in front of the real ones, with Hugging Face PEFT's
semantics kept exactly, so an adapter trained with either library gives the same logits in the other. Prompt
tuning and P-tuning prepend ``P`` learned embeddings to the input; prefix tuning prepends ``P`` learned
key/value vectors in every attention layer, as if they were a KV cache of length ``P``. The parameters live in
:mod:`.encoders`; :mod:`.model_config` sizes a config from the model and refuses what cannot work;
:mod:`.attach` puts an adapter on a model (encoder module, forward pre-hooks, attention switch) and takes it
off; the hooks of decoder-only and encoder models are in :mod:`.hooks` (their argument handling in
:mod:`.call_args`), those of encoder-decoder models in :mod:`.seq2seq`; prefix tuning adds :mod:`.cache` (the
KV cache that stands in for the prefix) and :mod:`.attention` (the attention function that adds it, fused on
CUDA).
"""
from .attach import add_prompt_learning, check_prompt_learning, remove_prompt_learning
from .attention import (
    ATTN_PREFIX, PREFIX_KWARG, SUPPORTED_ATTENTION, prefix_attention_forward, prefix_attention_problem,
)
from .cache import PrefixKV, prefix_cache_class
from .call_args import CACHE_KWARGS
from .encoders import ENCODER_ATTR, PrefixEncoder, PromptEmbedding, PromptEncoder, PromptLearning, prompt_learning_of
from .model_config import (
    CLASSIFICATION_TASKS, PROMPT_CONFIGS, SUPPORTED_TASKS, complete_config, is_seq2seq, uses_attention_interface,
)

__all__ = [
    "ATTN_PREFIX", "CACHE_KWARGS", "CLASSIFICATION_TASKS", "ENCODER_ATTR", "PREFIX_KWARG", "PROMPT_CONFIGS",
    "SUPPORTED_ATTENTION", "SUPPORTED_TASKS", "PrefixEncoder", "PrefixKV", "PromptEmbedding", "PromptEncoder",
    "PromptLearning", "add_prompt_learning", "check_prompt_learning", "complete_config", "is_seq2seq",
    "prefix_attention_forward", "prefix_attention_problem", "prefix_cache_class", "prompt_learning_of",
    "remove_prompt_learning", "uses_attention_interface",
]
