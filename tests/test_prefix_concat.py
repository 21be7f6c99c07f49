"""Prefix tuning on models that compute attention themselves (Bloom, GPT-J, GPT-Neo): the prefix goes
in through the KV cache, concatenated as PEFT does. Greedy generation matches peft token for token
(logits and training are in the coverage matrix); gradient checkpointing, which would drop the cache,
is refused instead of silently training without the prefix."""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")
import peftfast  # noqa: E402

from models import matrix_model  # noqa: E402


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
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = pm.generate(**kw)
        got = ours.generate(**kw)
        moved = (ours(input_ids=ids, attention_mask=mask).logits
                 - matrix_model(family)(input_ids=ids, attention_mask=mask).logits).abs().max()
    assert torch.equal(got, expected)
    assert moved > 1e-2, "the prefix changed nothing: the comparison would be vacuous"


def test_gradient_checkpointing_is_refused_where_it_would_drop_the_prefix():
    _, model = twins("bloom")
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=torch.randint(3, 90, (1, 6)))
