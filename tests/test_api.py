"""The public surface: configs and their JSON, backend choice, import hygiene, API round trips."""
import json
import os
import subprocess
import sys

import pytest
import torch

import peftfast
from peftfast import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, as_config
from peftfast.kernels import resolve_backend

from tiny import tiny_llama


def test_import_makes_no_cuda_call():
    code = (
        "import torch\n"
        "def boom(*a, **k): raise AssertionError('CUDA touched at import')\n"
        "torch.cuda.init = boom; torch.cuda._lazy_init = boom; torch.cuda.current_device = boom\n"
        "torch.cuda.get_device_properties = boom; torch.cuda.get_device_capability = boom\n"
        "import peftfast, peftfast.kernels\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_no_top_level_kernels_module_is_installed():
    import importlib.util

    spec = importlib.util.find_spec("peftfast.kernels")
    assert spec is not None
    # The repository's kernels/ must only be reachable as peftfast.kernels when run from elsewhere.
    out = subprocess.run([sys.executable, "-c", "import importlib.util;print(importlib.util.find_spec('kernels'))"],
                         capture_output=True, text=True, cwd="/", timeout=120)
    assert "peftfast" not in out.stdout and "/kernels/__init__" not in out.stdout


@pytest.mark.parametrize("cls,kwargs", [
    (LoraConfig, dict(r=4, lora_alpha=16, target_modules=["q_proj"], use_dora=True, rank_pattern={"q_proj": 2})),
    (IA3Config, dict(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])),
    (PrefixTuningConfig, dict(num_virtual_tokens=5, prefix_projection=True, task_type="CAUSAL_LM")),
    (PromptTuningConfig, dict(num_virtual_tokens=3, task_type="CAUSAL_LM")),
])
def test_config_json_round_trip_and_peft_agreement(cls, kwargs, tmp_path):
    import peft

    ours = cls(**kwargs)
    again = as_config(json.loads(ours.to_json_string()))
    assert again == ours
    theirs = getattr(peft, cls.__name__)(**kwargs)
    from_peft = as_config(theirs)
    for key, value in kwargs.items():
        got = getattr(from_peft, key)
        assert (sorted(got) if isinstance(got, list) else got) == (sorted(value) if isinstance(value, list) else value)
    # defaults agree with peft's for every field both define
    plain_ours, plain_theirs = cls().to_dict(), getattr(peft, cls.__name__)().to_dict()
    for key in plain_ours:
        if key in plain_theirs and key not in ("peft_type", "task_type"):
            assert plain_ours[key] == plain_theirs[key], key
    # peft reads our JSON
    path = tmp_path / "adapter_config.json"
    path.write_text(ours.to_json_string())
    loaded = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert loaded.peft_type.value == ours.peft_type


def test_config_from_path_and_dir(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    assert as_config(tmp_path).r == 2
    assert as_config(str(tmp_path / "adapter_config.json")).target_modules == ["q_proj"]


def test_as_config_does_not_mutate_callers_config():
    cfg = IA3Config()
    model = tiny_llama()
    peftfast.patch(model, cfg)
    assert cfg.target_modules is None


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("PEFTFAST_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", cpu) == "reference"
    with pytest.raises(RuntimeError, match="CUDA"):
        resolve_backend("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", cpu) == "triton"
    assert resolve_backend("auto", cpu, supported=False) == "reference"
    with pytest.raises(NotImplementedError, match="float64"):
        resolve_backend("triton", cpu, supported=False, why="float64 inputs")
    monkeypatch.setenv("PEFTFAST_BACKEND", "reference")
    assert resolve_backend("auto", cpu) == "reference"
    assert resolve_backend("triton", cpu) == "triton"  # an explicit choice beats the environment
    assert resolve_backend("reference", torch.device("cuda")) == "reference"


def test_trainable_flags_and_counts():
    model = tiny_llama()
    total_before = sum(p.numel() for p in model.parameters())
    peftfast.patch(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    t, total = peftfast.trainable_parameters(model)
    # q_proj: 32->32, v_proj: 32->16; two layers; r=4
    assert t == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert total == total_before + t


def test_second_adapter_inactive_until_set(tmp_path):
    model = tiny_llama()
    peftfast.patch(model, LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    ids = torch.randint(0, 64, (2, 5))
    y_a = model(ids).logits
    peftfast.patch(model, LoraConfig(target_modules=["q_proj"], init_lora_weights=False), adapter_name="b")
    assert torch.equal(model(ids).logits, y_a)
    q = model.model.layers[0].self_attn.q_proj
    assert not q.lora_A["b"].weight.requires_grad and q.lora_A["default"].weight.requires_grad
    peftfast.set_adapter(model, "b")
    assert not torch.allclose(model(ids).logits, y_a)
    assert q.lora_A["b"].weight.requires_grad and not q.lora_A["default"].weight.requires_grad


def test_unpatch_restores_bit_for_bit():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peftfast.patch(model, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    peftfast.unpatch(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("config", [LoraConfig(target_modules="all-linear", init_lora_weights=False),
                                    LoraConfig(target_modules="all-linear", init_lora_weights=False, use_dora=True),
                                    IA3Config(target_modules="all-linear", init_ia3_weights=False)],
                         ids=["lora", "dora", "ia3"])
def test_unpatch_restores_bit_for_bit_after_merge_cycle(config):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peftfast.patch(model, config)
    peftfast.merge(model, keep_original=True)
    merged = model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(merged, before["model.layers.0.self_attn.q_proj.weight"])  # the merge did change it
    peftfast.unpatch(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_unmerge_without_keep_original_is_exact_only_up_to_rounding():
    model = tiny_llama()
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peftfast.patch(model, LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    peftfast.merge(model)
    peftfast.unmerge(model)
    w1 = model.model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(w1, w0, rtol=1e-6, atol=1e-6)
    peftfast.merge(model, keep_original=True)
    peftfast.unmerge(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, w1)


def test_unpatch_merge_adapters_matches_patched_output():
    model = tiny_llama()
    peftfast.patch(model, LoraConfig(target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        y = model(ids).logits
        peftfast.unpatch(model, merge_adapters=True)
        y_merged = model(ids).logits
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(y_merged, y, rtol=1e-5, atol=1e-5)


def test_patch_returns_same_object_and_accepts_peft_config():
    import peft

    model = tiny_llama()
    assert peftfast.patch(model, peft.LoraConfig(r=2, target_modules=["q_proj"])) is model
    assert peftfast.adapter_config(model).r == 2


def test_default_targets_by_family():
    model = tiny_llama()
    peftfast.patch(model, LoraConfig())
    wrapped = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, peftfast.layers.LoraLayer)})
    assert wrapped == ["q_proj", "v_proj"]


def test_prefix_tuning_patches_a_model():
    model = peftfast.patch(tiny_llama(), PrefixTuningConfig(num_virtual_tokens=4))
    trainable, _ = peftfast.trainable_parameters(model)
    assert trainable == 4 * 2 * 2 * 2 * 8  # P x layers x (k, v) x kv_heads x head_dim
