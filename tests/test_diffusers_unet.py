"""Stable Diffusion: LoRA on a tiny diffusers UNet (attention projections and ResNet convolutions), built
from a config, against peft's `inject_adapter_in_model` (what diffusers' own `add_adapter` uses).

diffusers is an optional test extra (`pip install -e ".[sd]"`); without it this file is skipped. Float32,
same ops on both sides: 1e-5 relative is ~100x their float32 reordering and far below a wrong scaling,
kernel layout or key (which move the output by 1e-2 or more)."""
import copy
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import peftfast  # noqa: E402
from peftfast.checkpoint import adapter_state_dict  # noqa: E402
from peftfast.layers.conv_embedding import LoraConv  # noqa: E402

from helpers import assert_rel_close  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]


def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4).eval()


def run(model):
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 3, 8, generator=g)
    return model(sample, torch.tensor([10, 500]), encoder_hidden_states=text).sample


def test_unet_lora_matches_peft(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    theirs = peft.inject_adapter_in_model(copy.deepcopy(cfg), unet())
    saved = get_peft_model_state_dict(theirs)
    save_file({"base_model.model." + k: v.contiguous() for k, v in saved.items()},
              str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg.to_dict(), default=list))
    ours = peftfast.load_adapter(unet(), tmp_path, is_trainable=True)
    assert any(isinstance(m, LoraConv) for m in ours.modules()), "the ResNet convolutions were not wrapped"
    assert set(adapter_state_dict(ours)) == {"base_model.model." + k for k in saved}
    with torch.no_grad():
        expected = run(theirs)
        assert (expected - run(unet())).abs().max() > 1e-2, "adapter is a no-op: vacuous test"
        assert_rel_close(run(ours), expected, 1e-5, "UNet output")
    params = lambda m: [p for n, p in m.named_parameters() if "lora_" in n]  # noqa: E731
    for p in theirs.parameters():
        p.requires_grad_(False)  # freeze everything ...
    for p in params(theirs):
        p.requires_grad_(True)  # ... but the adapter, as peftfast does
    opt_t, opt_o = torch.optim.SGD(params(theirs), lr=0.1), torch.optim.SGD(params(ours), lr=0.1)
    assert sum(p.numel() for p in params(ours)) == sum(p.numel() for p in params(theirs))
    for _ in range(2):
        lt, lo = run(theirs).square().mean(), run(ours).square().mean()
        assert_rel_close(lo.detach(), lt.detach(), 1e-5, "loss")
        for opt, loss in ((opt_t, lt), (opt_o, lo)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        trained = run(ours)
        assert_rel_close(trained, run(theirs), 1e-5, "after training")
        peftfast.merge(ours)
        assert_rel_close(run(ours), trained, 1e-5, "merged")
