"""Bad input: each gets an error naming the problem, and the model is left exactly as it was."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftfast
from peftfast import ConfigError, IA3Config, LoraConfig

from tiny import assert_unchanged, snapshot, tiny_llama


def test_targets_matching_nothing_lists_existing_names():
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ConfigError) as e:
        peftfast.patch(model, LoraConfig(target_modules=["qq_proj"]))
    assert "q_proj" in str(e.value) and "down_proj" in str(e.value)
    assert_unchanged(model, snap)


def test_unsupported_layer_type_is_named():
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ConfigError, match="input_layernorm.*LlamaRMSNorm"):
        peftfast.patch(model, LoraConfig(target_modules=["input_layernorm", "q_proj"]))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("r", [0, -4])
def test_non_positive_rank(r):
    with pytest.raises(ConfigError, match="rank"):
        LoraConfig(r=r, target_modules=["q_proj"]).validate()
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ConfigError, match="rank"):
        peftfast.patch(model, {"peft_type": "LORA", "r": r, "target_modules": ["q_proj"]})
    assert_unchanged(model, snap)


def test_rank_pattern_non_positive_rank():
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ConfigError, match="rank_pattern"):
        peftfast.patch(model, LoraConfig(target_modules=["q_proj"], rank_pattern={"q_proj": 0}))
    assert_unchanged(model, snap)


def test_feedforward_outside_targets():
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ConfigError, match="feedforward_modules"):
        peftfast.patch(model, IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ConfigError, match="feedforward_modules"):
        peftfast.patch(model, IA3Config(target_modules=r".*\.k_proj", feedforward_modules=["down_proj"]))
    assert_unchanged(model, snap)


def test_patching_twice_under_one_name():
    model = tiny_llama()
    peftfast.patch(model, LoraConfig(target_modules=["q_proj"]))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already patched"):
        peftfast.patch(model, LoraConfig(target_modules=["v_proj"]))
    assert_unchanged_patched(model, snap)


def assert_unchanged_patched(model, snap):
    types, state, grads = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


@pytest.mark.parametrize("first_adapter, config, adapter_name, fail_at", [
    (None, LoraConfig(target_modules="all-linear"), "default", 5),
    (LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False),
     LoraConfig(target_modules=["q_proj", "k_proj"]), "second", 3),
], ids=["first-adapter", "second-adapter-keeps-first"])
def test_failure_midway_through_patch_rolls_back(monkeypatch, first_adapter, config, adapter_name, fail_at):
    model = tiny_llama()
    if first_adapter is not None:
        peftfast.patch(model, first_adapter)
    snap = snapshot(model)
    from peftfast import layers

    calls = {"n": 0}
    real = layers.LoraLayer.add_adapter

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError(f"simulated failure on layer {fail_at}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(layers.LoraLayer, "add_adapter", flaky)
    with pytest.raises(RuntimeError, match=f"simulated failure on layer {fail_at}"):
        peftfast.patch(model, config, adapter_name=adapter_name)
    assert calls["n"] == fail_at
    if first_adapter is None:
        assert_unchanged(model, snap)
    else:
        assert_unchanged_patched(model, snap)
        assert list(model.peftfast_state.configs) == ["default"]


def _saved_adapter(tmp_path, **cfg):
    model = tiny_llama()
    peftfast.patch(model, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False, **cfg))
    path = tmp_path / "adapter"
    peftfast.save_adapter(model, path)
    return path


def _edit_tensors(edit):
    def apply(path):
        tensors = load_file(path / "adapter_model.safetensors")
        edit(tensors)
        save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    return apply


def _edit_config(path):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["layer_replication"] = [[0, 2], [1, 2]]
    (path / "adapter_config.json").write_text(json.dumps(cfg))


WRONG_SHAPE_KEY = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"

# (what is done to a saved adapter directory, the error load_adapter raises, what its message must name)
DAMAGED_ADAPTERS = {
    "missing-weights": (lambda path: os.remove(path / "adapter_model.safetensors"), FileNotFoundError,
                        ["adapter_model.safetensors"]),
    "missing-config": (lambda path: os.remove(path / "adapter_config.json"), FileNotFoundError,
                       ["adapter_config.json"]),
    "unknown-key": (_edit_tensors(lambda t: t.__setitem__(
        "base_model.model.model.layers.0.self_attn.zz_proj.lora_A.weight", torch.randn(8, 32))),
        peftfast.AdapterLoadError, ["zz_proj"]),
    "wrong-shape": (_edit_tensors(lambda t: t.__setitem__(WRONG_SHAPE_KEY, torch.randn(32, 3))),
                    peftfast.AdapterLoadError, [WRONG_SHAPE_KEY, "(32, 3)", "(32, 8)"]),
    "missing-tensor": (_edit_tensors(lambda t: t.pop("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight")),
                       peftfast.AdapterLoadError, ["missing"]),
    "unimplemented-config-field": (_edit_config, ConfigError, ["layer_replication"]),
}


@pytest.mark.parametrize("case", list(DAMAGED_ADAPTERS))
def test_damaged_adapter_dir_is_refused_naming_the_problem(tmp_path, case):
    damage, error, named = DAMAGED_ADAPTERS[case]
    path = _saved_adapter(tmp_path)
    damage(path)
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(error) as e:
        peftfast.load_adapter(model, path)
    assert all(part in str(e.value) for part in named), str(e.value)
    assert_unchanged(model, snap)


def test_legacy_bin_loads_weights_only_and_only_without_safetensors(tmp_path):
    path = _saved_adapter(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    torch.save({k: torch.full_like(v, 0.5) for k, v in tensors.items()}, path / "adapter_model.bin")
    model = tiny_llama()
    peftfast.load_adapter(model, path)  # safetensors wins over .bin
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora_A["default"].weight,
                       tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    os.remove(path / "adapter_model.safetensors")
    model = tiny_llama()
    peftfast.load_adapter(model, path)
    assert torch.all(model.model.layers[0].self_attn.q_proj.lora_A["default"].weight == 0.5)


def test_legacy_bin_refuses_pickled_objects(tmp_path):
    path = _saved_adapter(tmp_path)
    os.remove(path / "adapter_model.safetensors")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, path / "adapter_model.bin")
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        peftfast.load_adapter(model, path)
    assert_unchanged(model, snap)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model = tiny_llama()
    peftfast.patch(model, LoraConfig(target_modules=["q_proj"]))
    import peftfast.checkpoint as ck

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "_model_card", broken)
    with pytest.raises(OSError, match="disk full"):
        peftfast.save_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [], "temporary files left behind"


def test_bad_backend_and_env(monkeypatch):
    model = tiny_llama()
    with pytest.raises(ValueError, match="backend"):
        peftfast.patch(model, LoraConfig(target_modules=["q_proj"]), backend="cuda")
    peftfast.patch(model, LoraConfig(target_modules=["q_proj"]))
    monkeypatch.setenv("PEFTFAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="PEFTFAST_BACKEND"):
        model(torch.randint(0, 64, (1, 4)))


def test_unknown_adapter_in_set_adapter():
    model = tiny_llama()
    peftfast.patch(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="default"):
        peftfast.set_adapter(model, "nope")


def test_operations_on_unpatched_model():
    with pytest.raises(ValueError, match="patch"):
        peftfast.save_adapter(tiny_llama(), "/tmp/never-written")


def test_not_a_config():
    with pytest.raises(ConfigError, match="adapter config"):
        peftfast.patch(tiny_llama(), 42)
