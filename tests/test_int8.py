"""LoRA on bitsandbytes 8-bit (LLM.int8) bases: the base module runs its own matmul, peftfast adds the
LoRA term; the results must equal PEFT's on the same 8-bit model."""
import copy

import pytest
import torch

import peftfast
from helpers import assert_rel_close, rel_err
from tiny import tiny_llama

bnb = pytest.importorskip("bitsandbytes")


def to_int8(model):
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, threshold=0.0)
                q.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
                setattr(module, name, q.to("cpu"))
    return model


@pytest.fixture
def pair(tmp_path):
    import peft

    base = to_int8(tiny_llama())
    assert base.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules="all-linear",
                                                                  init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    fast = copy.deepcopy(base)
    peftfast.load_adapter(fast, tmp_path, is_trainable=True)
    return base, pm, fast


def test_int8_forward_and_grads_match_peft(pair):
    base, pm, fast = pair
    ids = torch.randint(1, 64, (2, 7))
    ref = base(ids).logits
    y_peft, y_fast = pm(ids).logits, fast(ids).logits
    assert rel_err(y_peft, ref) > 1e-3, "the adapter must change the output for the test to mean anything"
    assert_rel_close(y_fast, y_peft, 1e-5, "int8 logits")
    pm(ids, labels=ids).loss.backward()
    fast(ids, labels=ids).loss.backward()
    g_peft = {n.replace("base_model.model.", ""): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    g_fast = {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}
    assert g_peft.keys() == g_fast.keys() and g_fast
    for name in g_fast:
        assert_rel_close(g_fast[name], g_peft[name], 1e-4, name)


def test_int8_merge_is_within_int8_rounding(pair):
    # Merging requantizes to int8 (as PEFT does): the merged output may differ by int8 rounding, about
    # 1/127 of each row's absmax per weight; we require it to stay within 5% of the output's scale.
    _, _, fast = pair
    ids = torch.randint(1, 64, (2, 7))
    with torch.no_grad():
        y = fast(ids).logits
        peftfast.merge(fast)
        y_merged = fast(ids).logits
        peftfast.unmerge(fast)
        y_back = fast(ids).logits
    assert rel_err(y_merged, y) < 0.05 and rel_err(y_back, y) < 0.05
    assert not torch.equal(y_merged, y), "merge must change the stored int8 weights"
