"""Prefix tuning on models that compute attention themselves (Bloom, GPT-J on older transformers, GPT-Neo):
the prefix goes in through the KV cache, concatenated as PEFT does. Greedy generation matches an uncached
hand-fed oracle (the base model with the prefix as a DynamicCache) in tokens and every step's logits, and peft
token for token where peft can pass the model a cache (logits and training are in the coverage matrix);
gradient checkpointing, which would drop the cache, is refused instead of silently training without the
prefix."""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")
import peftfast  # noqa: E402

from helpers import assert_rel_close  # noqa: E402
from models import matrix_model  # noqa: E402
import prompt_oracle as oracle  # noqa: E402


def twins(family):
    base = matrix_model(family)
    cfg = lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)  # noqa: E731
    pm = peft.get_peft_model(copy.deepcopy(base), cfg())
    with torch.no_grad():
        for p in pm.prompt_encoder["default"].parameters():
            p.normal_()
    ours = copy.deepcopy(base)
    peftfast.patch(ours, cfg())
    ours.peftfast_prompt_learning.encoders["default"].load_state_dict(pm.prompt_encoder["default"].state_dict())
    return pm, ours


@pytest.mark.parametrize("family", ["bloom", "gptj", "gpt_neo"])
def test_generation_matches_peft(family):
    pm, ours = twins(family)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 90, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    base = matrix_model(family)
    cfg = ours.peftfast_prompt_learning.configs["default"]
    prefix = ours.peftfast_prompt_learning.encoders["default"].prompt_embeddings().detach()
    got, got_logits = oracle.generate_with_logits(ours, ids, mask, 6)
    expected, expected_logits = oracle.prefix_greedy(base, prefix, cfg.num_layers, cfg.num_attention_heads, ids, mask,
                                                     6)
    with torch.no_grad():
        moved = (ours(input_ids=ids, attention_mask=mask).logits - base(input_ids=ids, attention_mask=mask).logits)
    assert moved.abs().max() > 1e-2, "the prefix changed nothing: the comparison would be vacuous"
    assert_rel_close(got_logits, expected_logits, 1e-5, f"{family}: logits of every generated token")
    assert torch.equal(got, expected)
    if oracle.peft_speaks_cache_kwarg(base):  # PEFT 0.21 passes past_key_values; 5.24 models take cache
        with torch.no_grad():
            assert torch.equal(got, pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                                pad_token_id=0))


def test_gradient_checkpointing_is_refused_where_it_would_drop_the_prefix():
    _, model = twins("bloom")
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=torch.randint(3, 90, (1, 6)))
