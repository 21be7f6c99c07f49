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


# --- Scaled embeddings: transformers' Gemma3TextScaledWordEmbedding returns E[x] * embed_scale -----------


def gemma3(tied: bool = False):
    """A tiny Gemma 3 text model (~25K parameters); its embed_tokens scales lookups by sqrt(hidden) ~ 5.66."""
    import transformers as tf

    if not hasattr(tf, "Gemma3ForCausalLM"):
        pytest.skip("this transformers has no Gemma 3")
    cfg = tf.Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                              sliding_window=4, pad_token_id=0, attention_dropout=0.0, tie_word_embeddings=tied)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return tf.Gemma3ForCausalLM(cfg).float().eval()


def _gemma3_inputs():
    inputs = without_labels(make_inputs("llama"))  # vocabulary 96, left padding with id 0
    ids = inputs["input_ids"]
    return inputs, sorted({0, int(ids[0, -1]), int(ids[1, -2])})


GEMMA3_CASES = {
    # untied: a merge into a tied embedding would change the head too (in PEFT as well), hiding the check
    "lora": (False, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "dora": (False, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True)),
    "tokens": (True, dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=None)),
}


def _adapter_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(GEMMA3_CASES))
def test_gemma3_scaled_embedding_matches_peft(tmp_path, case):
    """Logits both ways, saved tensors, AdamW steps and merge / unmerge (check_roundtrip), then every
    adapter gradient of one more step: an adapter term left unscaled is off by a factor ~5.66."""
    from peft_roundtrip import check_roundtrip

    inputs, chosen = _gemma3_inputs()
    tied, cfg = GEMMA3_CASES[case]
    if case == "tokens":
        cfg = dict(cfg, trainable_token_indices=chosen)
    build = lambda: gemma3(tied)  # noqa: E731
    assert build().model.embed_tokens.embed_scale.item() > 5, "not a scaled embedding: vacuous test"

    def run(m):
        return m(**inputs).logits

    pm, ours = check_roundtrip(tmp_path, build, run, "lora", cfg)
    grads = []
    for model in (pm, ours):
        model.zero_grad()
        run(model).square().mean().backward()
        grads.append(_adapter_grads(model))
    theirs = {k.removeprefix("base_model.model."): v for k, v in grads[0].items()}
    # PEFT nests trainable tokens under token_adapter; peftfast's wrapper holds them itself
    theirs = {k.replace("token_adapter.", ""): v for k, v in theirs.items()}
    assert theirs.keys() >= grads[1].keys() and grads[1], sorted(grads[1])
    for name, grad in grads[1].items():
        assert_rel_close(grad, theirs[name], TOL, f"grad of {name}")


class ScaledEmbedding(nn.Embedding):
    """An embedding scaling its lookups by a Python number (PEFT rounds it to the weight's dtype)."""

    def __init__(self, *args, scale=3.7, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_scale = scale

    def forward(self, ids):
        return super().forward(ids) * torch.tensor(self.embed_scale, dtype=self.weight.dtype)


class ScaledEmbedHead(nn.Module):
    def __init__(self, scale=3.7):
        super().__init__()
        torch.manual_seed(0)
        self.emb = ScaledEmbedding(37, 11, padding_idx=0, scale=scale)
        self.head = nn.Linear(11, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("use_dora", [False, True])
def test_number_embed_scale_matches_peft_and_the_merged_weight(tmp_path, use_dora):
    from peft_roundtrip import check_roundtrip

    ids = torch.tensor([[0, 5, 36, 7], [3, 3, 0, 12]])
    pm, ours = check_roundtrip(tmp_path, ScaledEmbedHead, lambda m: m(ids), "lora",
                               dict(r=4, lora_alpha=8, target_modules=["emb"], use_dora=use_dora))
    layer = ours.emb
    with torch.no_grad():
        unmerged = layer(ids)
        # the math: s * (E + dW)[x] (DoRA: s * (m / ||E + dW||) * (E + dW)[x]), s the scale in fp32
        w = layer.base_layer.weight + layer.delta_weight("default")
        if use_dora:
            w = w * (layer.lora_magnitude_vector["default"].weight / w.norm(dim=0))
        assert_rel_close(unmerged, w[ids] * 3.7, TOL, "scaled LoRA embedding vs the math")


def test_non_scalar_embed_scale_is_refused_and_the_model_unchanged():
    model = ScaledEmbedHead(scale=torch.full((11,), 2.0))
    snap = snapshot(model)
    for cfg in (dict(target_modules=["emb"]), dict(target_modules=["head"], trainable_token_indices={"emb": [3]})):
        with pytest.raises(peftfast.ConfigError, match=r"embed_scale is \(11,\), not a scalar"):
            peftfast.patch(model, peftfast.LoraConfig(r=2, **cfg))
        assert_unchanged(model, snap)
