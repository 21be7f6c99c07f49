"""LoRA features of PEFT's own test-suite (issue 17), each against Hugging Face PEFT.

Every case builds the same small model twice, lets PEFT make an adapter with random non-zero weights
(``init_lora_weights=False``: no no-op adapter can pass), and checks both ways: PEFT's file loads into
peftfast with the same outputs, peftfast's file holds the same keys and tensors and loads into PEFT, the
trainable parameter counts agree (when peftfast patches the base itself too), three AdamW steps give the
same losses and outputs, and merge / unmerge keep the trained outputs. All float32 with the same ops
on both sides, so 1e-5 relative is ~100x float32 reordering and far below a wrong key, scaling or
trainable flag (those move outputs by 1e-2 or more).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

import peftfast  # noqa: E402

from helpers import assert_rel_close  # noqa: E402
from peft_roundtrip import check_roundtrip  # noqa: E402

TOL = 1e-5
WEIGHTS = "adapter_model.safetensors"


def check_parity(tmp_path, build, run, cfg: dict, *, steps: int = 3, merge: bool = True) -> tuple:
    """The whole round trip against PEFT (tests/peft_roundtrip.py); returns (peft model, peftfast model)."""
    return check_roundtrip(tmp_path, build, run, "lora", cfg, steps=steps, merge=merge)


def _images(shape=(2, 3, 8, 8)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


class ConvHead(nn.Module):
    """A convolution with a bias (the layer under test) feeding a linear head."""

    def __init__(self, conv: nn.Module, features: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv = conv
        with torch.no_grad():  # a bias far from zero, so a bias that does (not) train shows
            self.conv.bias.uniform_(-1, 1)
        self.head = nn.Linear(features, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


# --- Wrong today (issue 17): bias="lora_only" on non-linear wrappers -------------------------------------


@pytest.mark.parametrize("kind", ["conv2d", "conv1d"])
def test_lora_only_bias_trains_on_convolutions_as_in_peft(tmp_path, kind):
    def build():
        torch.manual_seed(0)
        if kind == "conv2d":
            return ConvHead(nn.Conv2d(3, 100, 3), 100 * 6 * 6)
        return ConvHead(nn.Conv1d(3, 20, 3), 20 * 6)

    x = _images() if kind == "conv2d" else _images((2, 3, 8))
    pm, ours = check_parity(tmp_path, build, lambda m: m(x), dict(r=4, lora_alpha=8, target_modules=["conv"],
                                                                  bias="lora_only"))
    bias = ours.conv.base_layer.bias
    assert bias.requires_grad
    assert "base_model.model.conv.base_layer.bias" in load_file(tmp_path / "ours" / WEIGHTS)
    # trained, and to PEFT's values: the bias moved away from the base's
    assert not torch.equal(bias, build().conv.bias)
    assert_rel_close(bias.detach(), pm.base_model.model.conv.base_layer.bias.detach(), TOL, "trained bias")


# --- Wrong today (issue 17): one module reachable at two paths -------------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc(x))


class SharedTwice(nn.Module):
    """The same block at ``blocks.0`` and ``blocks.2``, as weight-tied models reuse a layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        block = Block()
        self.blocks = nn.Sequential(block, Block(), block)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.blocks(x))


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_module_at_two_paths_saves_once_and_loads_into_both(tmp_path, bias):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    pm, ours = check_parity(tmp_path, SharedTwice, lambda m: m(x),
                            dict(r=2, lora_alpha=4, target_modules=["fc"], bias=bias))
    saved = load_file(tmp_path / "ours" / WEIGHTS)
    assert "base_model.model.blocks.0.fc.lora_A.weight" in saved
    assert "base_model.model.blocks.2.fc.lora_A.weight" not in saved  # stored once, under the first path
    assert ours.blocks[0] is ours.blocks[2]


def test_module_at_two_paths_load_still_refuses_a_truly_missing_tensor(tmp_path):
    pm = peft.get_peft_model(SharedTwice(), peft.LoraConfig(r=2, target_modules=["fc"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / WEIGHTS
    sd = load_file(path)
    del sd["base_model.model.blocks.1.fc.lora_B.weight"]
    from safetensors.torch import save_file

    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(peftfast.checkpoint.AdapterLoadError, match=r"blocks\.1\.fc\.lora_B"):
        peftfast.load_adapter(SharedTwice(), tmp_path / "peft")


# --- lora_bias=True -------------------------------------------------------------------------------------


class MLP(nn.Module):
    """PEFT's test MLP shape: linears with and without a bias."""

    def __init__(self, bias_out: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 16)
        self.out = nn.Linear(16, 3, bias=bias_out)

    def forward(self, x):
        return self.out(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _x(n=10):
    return torch.randn(6, n, generator=torch.Generator().manual_seed(4))


def test_lora_bias_on_linear_matches_peft(tmp_path):
    x = _x()
    pm, ours = check_parity(tmp_path, MLP, lambda m: m(x),
                            dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], lora_bias=True))
    saved = load_file(tmp_path / "ours" / WEIGHTS)
    assert "base_model.model.lin0.lora_B.bias" in saved
    assert ours.lin0.lora_B["default"].bias.requires_grad
    assert_rel_close(ours.lin1.lora_B["default"].bias.detach(),
                     pm.base_model.model.lin1.lora_B["default"].bias.detach(), TOL, "trained lora_B.bias")


def test_lora_bias_on_conv_matches_peft(tmp_path):
    def build():
        torch.manual_seed(0)
        return ConvHead(nn.Conv2d(3, 6, 3), 6 * 6 * 6)

    x = _images()
    check_parity(tmp_path, build, lambda m: m(x), dict(r=4, lora_alpha=8, target_modules=["conv"], lora_bias=True))


def test_lora_bias_zero_at_init_and_refusals():
    model = peftfast.patch(MLP(), peftfast.LoraConfig(r=2, target_modules=["lin0"], lora_bias=True))
    assert torch.equal(model.lin0.lora_B["default"].bias, torch.zeros(20))  # a no-op at init, as PEFT
    with pytest.raises(peftfast.ConfigError, match="DoRA"):
        peftfast.LoraConfig(r=2, lora_bias=True, use_dora=True).validate()
    with pytest.raises(peftfast.ConfigError, match="init_lora_weights"):
        peftfast.LoraConfig(r=2, lora_bias=True, init_lora_weights="gaussian").validate()
    emb = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="lora_bias=True is not supported on nn.Embedding"):
        peftfast.patch(emb, peftfast.LoraConfig(r=2, target_modules=["0"], lora_bias=True))
    assert isinstance(emb[0], nn.Embedding)
    # no base bias to fold into: merging is refused (PEFT's rule), and the weights stay as they were
    with pytest.warns(UserWarning, match="without a bias"):
        nobias = peftfast.patch(MLP(bias_out=False), peftfast.LoraConfig(r=2, target_modules=["out"], lora_bias=True,
                                                                         init_lora_weights=False))
    before = nobias.out.base_layer.weight.clone()
    with pytest.raises(ValueError, match="without a bias"):
        peftfast.merge(nobias)
    assert torch.equal(nobias.out.base_layer.weight, before)


def test_lora_bias_on_the_triton_path_matches_the_reference():
    x = _x().requires_grad_(True)
    grads = []
    for backend in ("reference", "triton"):
        model = peftfast.patch(MLP(), peftfast.LoraConfig(r=4, target_modules=["lin0"], lora_bias=True,
                                                          init_lora_weights=False), backend=backend)
        y = model(x)
        y.square().sum().backward()
        grads.append((y.detach(), model.lin0.lora_B["default"].bias.grad, model.lin0.lora_B["default"].weight.grad))
    for ref, tri, what in zip(grads[0], grads[1], ("output", "dlora_B.bias", "dlora_B")):
        assert_rel_close(tri, ref, 1e-5, what)


# --- trainable_token_indices ----------------------------------------------------------------------------


def _llama(tied: bool = False):
    from models import FAMILIES

    model_cls, config_cls, kwargs, _ = FAMILIES["llama"]
    config = config_cls(**kwargs, tie_word_embeddings=tied)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return model_cls(config).float().eval()


def _llama_run():
    from models import make_inputs, without_labels

    inputs = without_labels(make_inputs("llama"))
    ids = inputs["input_ids"]
    # trained rows that the inputs use (the padding id 0 among them: its row gets no gradient)
    chosen = sorted({0, int(ids[0, -1]), int(ids[1, -2])})
    return (lambda m: m(**inputs).logits), chosen


@pytest.mark.parametrize("form", ["list", "dict", "tied"])
def test_trainable_token_indices_match_peft(tmp_path, form):
    run, chosen = _llama_run()
    spec = {"embed_tokens": chosen} if form == "dict" else chosen
    build = (lambda: _llama(tied=True)) if form == "tied" else _llama
    pm, ours = check_parity(tmp_path, build, run, dict(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                       trainable_token_indices=spec))
    saved = load_file(tmp_path / "ours" / WEIGHTS)
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    assert tuple(saved[key].shape) == (len(chosen), 32)
    assert not any("lm_head" in k for k in saved)  # a tied head's rows are the embedding's, stored once
    emb = ours.model.embed_tokens
    base = _llama(tied=form == "tied").model.embed_tokens.weight
    # only the chosen rows train: the base table is untouched, the chosen rows moved (but not the padding row)
    assert torch.equal(emb.base_layer.weight, base)
    values = emb.trainable_tokens_delta["default"].detach()
    assert torch.equal(values[0], base[0])
    assert not torch.equal(values[1:], base[chosen[1:]])
    if form == "tied":
        assert ours.lm_head.trainable_tokens_delta is emb.trainable_tokens_delta
        assert pm.base_model.model.lm_head.token_adapter.trainable_tokens_delta["default"] is (
            pm.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"])


def test_trainable_token_indices_refusals_leave_the_model_unchanged():
    from tiny import assert_unchanged, snapshot

    model = _llama()
    snap = snapshot(model)
    for cfg, match in (
        (dict(target_modules=["q_proj", "embed_tokens"], trainable_token_indices=[3]), "both LoRA targets"),
        (dict(target_modules=["q_proj"], trainable_token_indices=[3, 500]), r"out of range: \[500\]"),
        (dict(target_modules=["q_proj"], trainable_token_indices={"nope": [3]}), "no module of that name"),
        (dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": []}), "non-empty list"),
    ):
        with pytest.raises((ValueError, peftfast.ConfigError), match=match):
            peftfast.patch(model, peftfast.LoraConfig(r=2, **cfg))
        assert_unchanged(model, snap)


# --- LoRA on nn.Conv3d and on grouped convolutions -------------------------------------------------------


def test_lora_on_conv3d_matches_peft(tmp_path):
    def build():
        torch.manual_seed(0)
        return ConvHead(nn.Conv3d(2, 4, 3, stride=1, padding=1), 4 * 4 * 4 * 4)

    x = _images((2, 2, 4, 4, 4))
    check_parity(tmp_path, build, lambda m: m(x), dict(r=4, lora_alpha=8, target_modules=["conv"]))


@pytest.mark.parametrize("dim", [1, 2])
def test_lora_on_grouped_conv_matches_peft_and_refuses_to_merge(tmp_path, dim):
    def build():
        torch.manual_seed(0)
        conv = nn.Conv2d(4, 6, 3, groups=2) if dim == 2 else nn.Conv1d(4, 6, 3, groups=2)
        return ConvHead(conv, 6 * 6 * 6 if dim == 2 else 6 * 6)

    x = _images((2, 4, 8, 8)) if dim == 2 else _images((2, 4, 8))
    pm, ours = check_parity(tmp_path, build, lambda m: m(x), dict(r=4, lora_alpha=8, target_modules=["conv"]),
                            merge=False)
    assert ours.conv.lora_B["default"].groups == 2
    before = ours.conv.base_layer.weight.clone()
    with pytest.raises(ValueError, match="groups=2"):
        peftfast.merge(ours)
    assert torch.equal(ours.conv.base_layer.weight, before) and not ours.conv.merged
