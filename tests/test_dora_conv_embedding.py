"""DoRA on nn.Embedding and nn.Conv1d/2d/3d (issue 17, item 3) against Hugging Face PEFT.

Round trips (tests/peft_roundtrip.py): outputs both ways, saved keys (``...lora_magnitude_vector``) and
tensors, trainable counts, AdamW steps, merge / unmerge. The norm axis is the point of these tests: an
embedding normalizes each embedding dimension over the vocabulary (magnitude [dim]), a convolution each
output channel over input channels and kernel (magnitude [1, out, 1, ...]); the other axis gives another
magnitude shape or, where shapes agree, outputs off by far more than the 1e-5 tolerance.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")

import peftfast  # noqa: E402
from peftfast.layers.conv_embedding import LoraConv, LoraEmbedding  # noqa: E402

from helpers import assert_rel_close  # noqa: E402
from models import make_inputs, make_model, without_labels  # noqa: E402
from peft_roundtrip import TOL, check_roundtrip  # noqa: E402


class EmbedHead(nn.Module):
    """An embedding with a padding row (odd vocabulary and width) feeding a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(37, 11, padding_idx=0)
        self.head = nn.Linear(11, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


class ConvHead(nn.Module):
    """One convolution with a bias far from zero (the layer under test) feeding a linear head."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.conv = conv(3, 6, 3, stride=2, padding=1, bias=bias)
        if bias:
            with torch.no_grad():
                self.conv.bias.uniform_(-1, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(2).mean(-1))


def _images(dim: int):
    shape = {1: (2, 3, 11), 2: (2, 3, 9, 7), 3: (2, 3, 5, 7, 6)}[dim]
    return torch.randn(*shape, generator=torch.Generator().manual_seed(6))


def test_dora_on_embedding_matches_peft(tmp_path):
    ids = torch.tensor([[0, 5, 36, 7], [3, 3, 0, 12]])  # the padding id among them
    pm, ours = check_roundtrip(tmp_path, EmbedHead, lambda m: m(ids), "lora",
                               dict(r=4, lora_alpha=8, target_modules=["emb"], use_dora=True))
    layer = ours.emb
    assert isinstance(layer, LoraEmbedding)
    assert tuple(layer.lora_magnitude_vector["default"].weight.shape) == (11,)  # one per embedding dimension
    assert_rel_close(layer.lora_magnitude_vector["default"].weight.detach(),
                     pm.base_model.model.emb.lora_magnitude_vector["default"].weight.detach(), TOL, "trained m")


def test_dora_on_llama_embed_tokens_matches_peft(tmp_path):
    inputs = without_labels(make_inputs("llama"))
    check_roundtrip(tmp_path, lambda: make_model("llama"), lambda m: m(**inputs).logits, "lora",
                    dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_dora_on_conv_matches_peft(tmp_path, dim, bias):
    x = _images(dim)
    pm, ours = check_roundtrip(tmp_path, lambda: ConvHead(dim, bias), lambda m: m(x), "lora",
                               dict(r=4, lora_alpha=8, target_modules=["conv"], use_dora=True))
    layer = ours.conv
    assert isinstance(layer, LoraConv)
    assert tuple(layer.lora_magnitude_vector["default"].weight.shape) == (1, 6) + (1,) * dim  # per output channel
    assert_rel_close(layer.lora_magnitude_vector["default"].weight.detach(),
                     pm.base_model.model.conv.lora_magnitude_vector["default"].weight.detach(), TOL, "trained m")


def test_dora_on_conv_with_dropout_in_training_matches_peft():
    """With dropout, PEFT recomputes the base conv on the dropped-out input for the DoRA term; same seed,
    same mask, so outputs and every adapter gradient must agree."""
    x = _images(2)
    cfg = dict(r=4, lora_alpha=8, target_modules=["conv"], use_dora=True, lora_dropout=0.3, init_lora_weights=False)
    torch.manual_seed(1)
    pm = peft.get_peft_model(ConvHead(2), peft.LoraConfig(**cfg)).train()
    with torch.no_grad():  # m != ||W + dW|| (as after training): otherwise the (m / norm - 1) base term is 0
        pm.base_model.model.conv.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, 6).view(1, 6, 1, 1))
    torch.manual_seed(1)
    ours = peftfast.patch(ConvHead(2), peftfast.LoraConfig(**cfg)).train()
    ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in pm.state_dict().items()})
    outs = []
    for model in (pm, ours):
        torch.manual_seed(2)
        y = model(x)
        y.square().mean().backward()
        outs.append(y)
    assert_rel_close(outs[1], outs[0], TOL, "training output with dropout")
    with torch.no_grad():
        assert (outs[1] - ours.eval()(x)).abs().max() > 1e-3, "dropout did nothing: vacuous test"
    theirs = pm.base_model.model.conv
    for attr in ("lora_A", "lora_B"):
        assert_rel_close(getattr(ours.conv, attr)["default"].weight.grad,
                         getattr(theirs, attr)["default"].weight.grad, TOL, f"d{attr}")
    assert_rel_close(ours.conv.lora_magnitude_vector["default"].weight.grad,
                     theirs.lora_magnitude_vector["default"].weight.grad, TOL, "dm")


def test_dora_magnitude_at_init_is_the_weight_norm_and_a_no_op():
    x = _images(2)
    model = peftfast.patch(ConvHead(2), peftfast.LoraConfig(r=2, target_modules=["conv"], use_dora=True))
    w = model.conv.base_layer.weight
    assert torch.allclose(model.conv.lora_magnitude_vector["default"].weight.flatten(), w.flatten(1).norm(dim=1))
    with torch.no_grad():
        assert_rel_close(model(x), ConvHead(2)(x), TOL, "DoRA at init (B = 0)")
    emb = peftfast.patch(EmbedHead(), peftfast.LoraConfig(r=2, target_modules=["emb"], use_dora=True))
    table = emb.emb.base_layer.weight
    assert torch.allclose(emb.emb.lora_magnitude_vector["default"].weight, table.norm(dim=0))


def test_dora_on_conv_and_embedding_refuses_a_zero3_shard():
    """Under ZeRO-3 a weight outside its module's forward is a shard (it carries ``ds_id``): the norm
    would be of a fragment, so the forward refuses instead of computing garbage."""
    for model, inp in ((peftfast.patch(ConvHead(2), peftfast.LoraConfig(r=2, target_modules=["conv"], use_dora=True)),
                        _images(2)),
                       (peftfast.patch(EmbedHead(), peftfast.LoraConfig(r=2, target_modules=["emb"], use_dora=True)),
                        torch.tensor([[1, 2]]))):
        layer = model.conv if hasattr(model, "conv") else model.emb
        layer.base_layer.weight.ds_id = 0
        with pytest.raises(NotImplementedError, match="ZeRO-3"):
            model(inp)
