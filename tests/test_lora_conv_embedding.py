"""LoRA on nn.Embedding and nn.Conv1d/Conv2d against Hugging Face PEFT.

Adapters are made by PEFT with ``init_lora_weights=False`` (random, not a no-op), saved, and loaded into
peftfast (and the reverse); both sides then compute logits, a few AdamW steps and merges in float32 with
the same ops, so 1e-5 relative is ~100x their float32 reordering and far below a wrong key, scaling or
padding index (which moves outputs by 1e-2 or more).
"""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

import peftfast  # noqa: E402
from peftfast.layers.conv_embedding import LoraConv, LoraEmbedding  # noqa: E402

from helpers import assert_rel_close, train_side_by_side  # noqa: E402
from models import make_inputs, make_model, without_labels  # noqa: E402
from tiny import assert_unchanged, snapshot  # noqa: E402

TOL = 1e-5


class ConvNet(nn.Module):
    """Conv1d and Conv2d with odd kernels, stride, padding and a bias; no transformers needed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv2d = nn.Conv2d(3, 6, kernel_size=3, stride=2, padding=1)
        self.pointwise = nn.Conv2d(6, 5, kernel_size=1)
        self.conv1d = nn.Conv1d(5, 7, kernel_size=3, padding=1, bias=False)
        self.head = nn.Linear(7, 4)

    def forward(self, x):
        h = torch.relu(self.pointwise(torch.relu(self.conv2d(x))))  # [B, 5, H', W']
        h = self.conv1d(h.flatten(2))  # [B, 7, L]
        return self.head(h.mean(-1))


def vit():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=48, num_labels=3, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return tf.ViTForImageClassification(cfg).eval()


CASES = {
    "llama-embedding": (lambda: make_model("llama"), ["embed_tokens", "q_proj"], None),
    "convnet": (ConvNet, ["conv2d", "pointwise", "conv1d"], None),
    "vit-patch-embedding": (vit, ["projection", "query", "value"], ["classifier"]),
}


def run(model, case):
    if case.startswith("llama"):
        return model(**without_labels(make_inputs("llama"))).logits
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    out = model(x) if case == "convnet" else model(pixel_values=x).logits
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_parity_both_directions_and_training(tmp_path, case):
    build, targets, save = CASES[case]
    cfg = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, modules_to_save=save)
    pm = peft.get_peft_model(build(), peft.LoraConfig(**cfg))
    pm.save_pretrained(tmp_path / "peft")
    ours = peftfast.load_adapter(build(), tmp_path / "peft", is_trainable=True)
    kinds = {type(m) for m in ours.modules()}
    assert LoraConv in kinds or LoraEmbedding in kinds
    with torch.no_grad():
        expected = run(pm, case)
        assert (expected - run(build(), case)).abs().max() > 1e-2, "adapter is a no-op: vacuous test"
        assert_rel_close(run(ours, case), expected, TOL, "logits, PEFT adapter in peftfast")
    peftfast.save_adapter(ours, tmp_path / "ours")
    a, b = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    back = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    with torch.no_grad():
        assert_rel_close(run(back, case), expected, TOL, "logits, peftfast adapter in PEFT")

    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == sum(
        p.numel() for p in pm.parameters() if p.requires_grad)
    train_side_by_side(pm, ours, lambda m: run(m, case).square().mean(), TOL)
    with torch.no_grad():
        trained = run(ours, case)
        assert_rel_close(trained, run(pm, case), TOL, "logits after training")
        peftfast.merge(ours)
        assert_rel_close(run(ours, case), trained, TOL, "merged")
        peftfast.unmerge(ours)
        assert_rel_close(run(ours, case), trained, TOL, "unmerged")


def test_embedding_keeps_padding_idx_and_unpatch_restores():
    model = make_model("llama")
    snap = snapshot(model)
    peftfast.patch(model, peftfast.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
    layer = model.model.embed_tokens
    assert isinstance(layer, LoraEmbedding)
    out = layer(torch.tensor([[0, 5]]))
    out.sum().backward()
    # F.embedding with padding_idx gives the padding row no gradient, in the base and in lora_embedding_A
    assert layer.lora_embedding_A["default"].grad[:, 0].abs().sum() == 0
    assert layer.lora_embedding_A["default"].grad[:, 5].abs().sum() > 0
    peftfast.unpatch(model)
    assert_unchanged(model, snap)


def test_grouped_conv_with_indivisible_rank_is_refused_and_model_unchanged():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="groups=2 needs a rank divisible"):
        peftfast.patch(model, peftfast.LoraConfig(r=3, target_modules=["0"]))
    assert_unchanged(model, snap)
    # DoRA on a grouped conv: PEFT's weight norm lays B @ A out wrongly there, so peftfast refuses it
    with pytest.raises(ValueError, match="DoRA on a Conv2d with groups=2"):
        peftfast.patch(model, peftfast.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    assert_unchanged(model, snap)
