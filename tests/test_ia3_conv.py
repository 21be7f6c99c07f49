"""IA3 on nn.Conv2d / nn.Conv3d (issue 17, item 3) against Hugging Face PEFT.

Round trips (tests/peft_roundtrip.py): outputs both ways, saved keys and tensors, trainable counts,
AdamW steps, merge / unmerge. Feed-forward layers scale input channels, the others output channels
(bias included), which the cases tell apart: a wrong choice changes the ``ia3_l`` shape, and where the
channel counts agree it changes the outputs by far more than the 1e-5 tolerance.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")

import peftfast  # noqa: E402
from peftfast.layers.ia3_conv import IA3Conv  # noqa: E402

from helpers import assert_rel_close  # noqa: E402
from peft_roundtrip import TOL, check_roundtrip  # noqa: E402
from tiny import assert_unchanged, snapshot  # noqa: E402


class Convs(nn.Module):
    """Two convolutions (odd channels, stride, padding, biases far from zero) and a linear head."""

    def __init__(self, dim: int = 2, groups: int = 1):
        super().__init__()
        torch.manual_seed(0)
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        self.conv_in = conv(3 * groups, 6 * groups, 3, stride=2, padding=1, groups=groups)
        self.conv_ff = conv(6 * groups, 5, 3, padding=1)
        with torch.no_grad():
            self.conv_in.bias.uniform_(-1, 1)
            self.conv_ff.bias.uniform_(-1, 1)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        h = self.conv_ff(torch.relu(self.conv_in(x)))
        return self.head(h.flatten(2).mean(-1))


def _inputs(dim: int, channels: int = 3):
    shape = (2, channels, 9, 7) if dim == 2 else (2, channels, 5, 7, 6)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("ff", ["list", "regex", "none"])
def test_ia3_on_conv_matches_peft(tmp_path, dim, ff):
    x = _inputs(dim)
    feedforward = {"list": ["conv_ff"], "regex": r".*_ff", "none": []}[ff]
    targets = ["conv_in", "conv_ff"] if ff != "regex" else r"conv_.*"
    pm, ours = check_roundtrip(tmp_path, lambda: Convs(dim), lambda m: m(x), "ia3",
                               dict(target_modules=targets, feedforward_modules=feedforward))
    assert isinstance(ours.conv_in, IA3Conv) and isinstance(ours.conv_ff, IA3Conv)
    ones = (1,) * dim  # the spatial axes
    assert tuple(ours.conv_in.ia3_l["default"].shape) == (1, 6) + ones  # output channels
    ff_channels = 6 if ff != "none" else 5  # input channels when feed-forward, else output channels
    assert tuple(ours.conv_ff.ia3_l["default"].shape) == (1, ff_channels) + ones
    assert ours.conv_ff.is_feedforward == (ff != "none")
    # trained to PEFT's values
    assert_rel_close(ours.conv_ff.ia3_l["default"].detach(),
                     pm.base_model.model.conv_ff.ia3_l["default"].detach(), TOL, "trained ia3_l")


@pytest.mark.parametrize("feedforward", [True, False])
def test_ia3_on_grouped_conv_matches_peft_and_merges(tmp_path, feedforward):
    # a grouped kernel holds in/groups input channels per output: the feed-forward merge must repeat
    # each group's slice of ia3_l, not broadcast the whole vector
    x = _inputs(2, channels=6)
    ffm = ["conv_in"] if feedforward else []
    pm, ours = check_roundtrip(tmp_path, lambda: Convs(2, groups=2), lambda m: m(x), "ia3",
                               dict(target_modules=["conv_in"], feedforward_modules=ffm))
    with torch.no_grad():
        trained = ours(x)
        peftfast.merge(ours)
        pm.merge_adapter()
        assert_rel_close(ours.conv_in.base_layer.weight, pm.base_model.model.conv_in.base_layer.weight, TOL,
                         "merged kernel")
        assert_rel_close(ours.conv_in.base_layer.bias, pm.base_model.model.conv_in.base_layer.bias, TOL,
                         "merged bias")
        assert_rel_close(ours(x), trained, TOL, "merged outputs")


def test_ia3_on_conv_fan_in_fan_out_is_irrelevant_and_init_is_a_no_op():
    x = _inputs(2)
    outs = []
    for fan in (False, True):
        model = peftfast.patch(Convs(), peftfast.IA3Config(target_modules=["conv_in", "conv_ff"],
                                                            feedforward_modules=["conv_ff"], fan_in_fan_out=fan,
                                                            init_ia3_weights=False))
        outs.append(model(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # same seed, same numbers
    # init_ia3_weights=True (the default): ones, so the adapter starts as the identity, as in PEFT
    model = peftfast.patch(Convs(), peftfast.IA3Config(target_modules=["conv_in", "conv_ff"],
                                                        feedforward_modules=["conv_ff"]))
    assert torch.equal(model.conv_in.ia3_l["default"], torch.ones(1, 6, 1, 1))
    with torch.no_grad():
        assert_rel_close(model(x), Convs()(x), TOL, "init adapter")


def test_ia3_on_conv1d_is_refused_as_in_peft():
    model = nn.Sequential(nn.Conv1d(3, 4, 3))
    snap = snapshot(model)
    with pytest.raises(peftfast.ConfigError, match="Conv1d"):
        peftfast.patch(model, peftfast.IA3Config(target_modules=["0"], feedforward_modules=[]))
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="not supported"):  # PEFT has no IA3 for nn.Conv1d either
        peft.get_peft_model(nn.Sequential(nn.Conv1d(3, 4, 3)), peft.IA3Config(target_modules=["0"],
                                                                              feedforward_modules=[]))


def test_ia3_conv_multiple_adapters_multiply_and_unpatch_restores():
    x = _inputs(2)
    model = Convs()
    snap = snapshot(model)
    cfg = dict(target_modules=["conv_in"], feedforward_modules=[], init_ia3_weights=False)
    peftfast.patch(model, peftfast.IA3Config(**cfg))
    peftfast.patch(model, peftfast.IA3Config(**cfg), adapter_name="other")
    peftfast.set_adapter(model, ["default", "other"])
    layer = model.conv_in
    l = layer.ia3_l["default"] * layer.ia3_l["other"]
    with torch.no_grad():
        expected = model.head(model.conv_ff(torch.relu(layer.base_layer(x) * l)).flatten(2).mean(-1))
        assert_rel_close(model(x), expected, TOL, "two adapters multiply")
    peftfast.unpatch(model)
    assert_unchanged(model, snap)
