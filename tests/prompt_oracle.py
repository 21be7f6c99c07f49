"""Prompt-learning oracles that need neither peftfast's hooks nor Hugging Face PEFT.

PEFT is the parity oracle where it works, but on some transformers releases it refuses a case (prefix tuning
on classification models once the forward's cache argument became ``cache``) or generates wrongly (its
generate() reads the cache from ``past_key_values``, which 5.24's generate() passes as ``cache``). These functions compute the same semantics by hand on the *unpatched* base model:

* prefix tuning: the prefix K/V fed as a transformers ``DynamicCache`` of ``P`` past tokens (PEFT's layout:
  ``prompt_embeddings`` [P, 2L * Hkv * D] -> layer ``i`` keys are rows ``2i``, values ``2i + 1``), the mask
  extended with ``P`` ones, explicit positions shifted by ``P``;
* prompt tuning / P-tuning: the virtual-token embeddings concatenated before ``inputs_embeds``, the mask
  extended with ``P`` ones, positions left to the model.

Generation is greedy and *uncached*: every step reruns the whole sequence, so the model's KV-cache handling
(where the version drift lives) is not part of the oracle.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn as nn


def cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward takes its KV cache by (``cache`` from transformers 5.24 on)."""
    for module in (model, getattr(model, "base_model", None)):
        if isinstance(module, nn.Module):
            params = inspect.signature(type(module).forward).parameters
            for key in ("cache", "past_key_values"):
                if key in params:
                    return key
    return "past_key_values"


def peft_speaks_cache_kwarg(model: nn.Module) -> bool:
    """Whether PEFT (which passes and inspects ``past_key_values`` only, up to 0.21 at least) can hand this
    model a cache: false once transformers renamed the argument, where PEFT refuses prefix classification and
    its prompt-learning generate() goes wrong."""
    return cache_kwarg(model) == "past_key_values"


def prefix_cache(prompt_embeddings: torch.Tensor, num_layers: int, kv_heads: int, batch: int):
    """A transformers DynamicCache holding the prefix as ``P`` past tokens of every layer."""
    from transformers import DynamicCache

    p = prompt_embeddings.shape[0]
    kv = prompt_embeddings.view(p, 2 * num_layers, kv_heads, -1).permute(1, 2, 0, 3)  # [2L, Hkv, P, D]
    cache = DynamicCache()
    for i in range(num_layers):
        keys = kv[2 * i].unsqueeze(0).expand(batch, -1, -1, -1).contiguous()
        values = kv[2 * i + 1].unsqueeze(0).expand(batch, -1, -1, -1).contiguous()
        cache.update(keys, values, i)
    return cache


def _ones_before(mask: torch.Tensor, p: int) -> torch.Tensor:
    return torch.cat([mask.new_ones(mask.shape[0], p), mask], dim=1)


def prefix_forward(base: nn.Module, prompt_embeddings: torch.Tensor, num_layers: int, kv_heads: int,
                   input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: Optional[torch.Tensor] = None, **kwargs):
    """The base model's output with the prefix given as a cache of ``P`` past tokens."""
    p = prompt_embeddings.shape[0]
    cache = prefix_cache(prompt_embeddings, num_layers, kv_heads, input_ids.shape[0])
    if position_ids is not None:
        kwargs["position_ids"] = position_ids + p
    kwargs[cache_kwarg(base)] = cache
    return base(input_ids=input_ids, attention_mask=_ones_before(attention_mask, p), **kwargs)


def prompt_forward(base: nn.Module, prompt_embeddings: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, **kwargs):
    """The base model's output with the virtual tokens' embeddings placed before the input's."""
    embeds = base.get_input_embeddings()(input_ids)
    prompts = prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(input_ids.shape[0], -1, -1)
    p = prompt_embeddings.shape[0]
    if "token_type_ids" in kwargs and kwargs["token_type_ids"] is not None:
        types = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], p), types], dim=1)
    return base(inputs_embeds=torch.cat([prompts, embeds], dim=1), attention_mask=_ones_before(attention_mask, p),
                **kwargs)


def generation_positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids generate() gives a left-padded batch: the count of real tokens so far, pads at 0."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def greedy(step, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           eos_token_id: Optional[int] = None, pad_token_id: int = 0) -> tuple:
    """Uncached greedy decoding: ``step(ids, mask)`` returns the logits of the whole sequence, whose last
    position picks the next token; a row that emitted ``eos_token_id`` continues with ``pad_token_id`` and
    decoding stops when every row has, as in generate(). Returns (sequences [B, N + steps], logits
    [steps, B, V])."""
    ids, mask, logits = input_ids, attention_mask, []
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        last = step(ids, mask)[:, -1].float()
        logits.append(last)
        token = last.argmax(-1).masked_fill(done, pad_token_id)
        if eos_token_id is not None:
            done = done | (token == eos_token_id)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if done.all():  # generate() stops once every row has ended
            break
    return ids, torch.stack(logits)


def _eos(model: nn.Module) -> Optional[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):  # one stop token is all these tiny models have
        eos = eos[0] if eos else None
    return eos


def seq2seq_prefix_cache(prompt_embeddings: torch.Tensor, num_layers: int, heads: int, batch: int):
    """PEFT's prefix cache for encoder-decoder models, built by hand: the [P, 2L * H * D] table read as 2L
    rows of [H, P, D] and doubled (4L rows); decoder layer ``i`` takes rows ``4i`` (keys) and ``4i + 1``
    (values) of the doubled table, i.e. rows ``4i mod 2L`` and ``(4i + 1) mod 2L``; the cross-attention
    part starts empty (PEFT discards the cross-attention rows, since the encoder output changes)."""
    from transformers import DynamicCache, EncoderDecoderCache

    p = prompt_embeddings.shape[0]
    kv = prompt_embeddings.view(p, 2 * num_layers, heads, -1).permute(1, 2, 0, 3)  # [2L, H, P, D]
    self_attention = DynamicCache()
    for i in range(num_layers):
        keys = kv[(4 * i) % (2 * num_layers)].unsqueeze(0).expand(batch, -1, -1, -1).contiguous()
        values = kv[(4 * i + 1) % (2 * num_layers)].unsqueeze(0).expand(batch, -1, -1, -1).contiguous()
        self_attention.update(keys, values, i)
    return EncoderDecoderCache(self_attention, DynamicCache())


def seq2seq_prefix_greedy(base: nn.Module, prompt_embeddings: torch.Tensor, num_layers: int, heads: int,
                          input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> tuple:
    """Greedy decoding of an encoder-decoder model with a decoder prefix, rerunning encoder and decoder every
    step. Returns (decoder sequences [B, 1 + new], per-step logits [new, B, V])."""
    start = base.generation_config.decoder_start_token_id
    if start is None:
        start = base.config.decoder_start_token_id
    batch = input_ids.shape[0]
    decoder = torch.full((batch, 1), start, dtype=input_ids.dtype, device=input_ids.device)

    def step(dec, _mask):
        kwargs = {cache_kwarg(base): seq2seq_prefix_cache(prompt_embeddings, num_layers, heads, batch)}
        return base(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec, **kwargs).logits

    return greedy(step, decoder, torch.ones_like(decoder), max_new_tokens, eos_token_id=_eos(base),
                  pad_token_id=base.generation_config.pad_token_id or 0)


def prefix_greedy(base: nn.Module, prompt_embeddings: torch.Tensor, num_layers: int, kv_heads: int,
                  input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> tuple:
    """Greedy decoding with the prefix, positions as generate() numbers them (when the model takes them)."""
    takes_positions = "position_ids" in inspect.signature(type(base).forward).parameters

    def step(ids, mask):
        positions = generation_positions(mask) if takes_positions else None
        return prefix_forward(base, prompt_embeddings, num_layers, kv_heads, ids, mask, positions).logits

    return greedy(step, input_ids, attention_mask, max_new_tokens, eos_token_id=_eos(base))


def prompt_greedy(base: nn.Module, prompt_embeddings: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, max_new_tokens: int) -> tuple:
    """Greedy decoding with virtual tokens; the model numbers positions itself (PEFT drops explicit ones)."""
    return greedy(lambda ids, mask: prompt_forward(base, prompt_embeddings, ids, mask).logits,
                  input_ids, attention_mask, max_new_tokens, eos_token_id=_eos(base))


@torch.no_grad()
def generate_with_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         max_new_tokens: int) -> tuple:
    """model.generate (cached, greedy) as (sequences, per-step logits [steps, B, V])."""
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack([x.float() for x in out.logits])
