"""``peftfast generate / merge / inspect`` and chat data, on the embedded tiny Llama and a tiny local
transformers model with a chat template (CPU, a few steps each)."""
import json

import pytest
import torch

import peftfast
from peftfast.cli import main as cli_main
from peftfast.cli.data import DataError, byte_tokenizer, chat_example, hf_tokenizer, load_dataset
from peftfast.cli.train import main as train_main

FAST = ["--seq-len", "32", "--batch-size", "4", "--logging-steps", "100"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Adapters trained by `peftfast train` on the embedded base: QLoRA (default), LoRA, prefix tuning."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for method in ("qlora", "lora", "prefix"):
        out[method] = root / method
        train_main(["--max-steps", "4", "--method", method, "--lr", "3e-2", "--num-virtual-tokens", "4",
                    "--output", str(out[method]), *FAST])
    return out


# ---------------------------------------------------------------------------------------------------
# The embedded base is rebuilt, not stored
# ---------------------------------------------------------------------------------------------------

def test_embedded_base_rebuilds_identically():
    from peftfast.cli.basemodel import build_embedded_base, fingerprint

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = build_embedded_base(), build_embedded_base()
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert fingerprint(a) == fingerprint(b)


def test_train_records_embedded_base(trained):
    from peftfast.cli.basemodel import EMBEDDED_NAME, build_embedded_base, fingerprint

    cfg = json.loads((trained["qlora"] / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == EMBEDDED_NAME
    log = json.loads((trained["qlora"] / "train_log.json").read_text())
    assert log["base_sha256"] == fingerprint(build_embedded_base()) and log["method"] == "qlora"


# ---------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["qlora", "prefix"])
def test_generate_greedy_matches_manual_loop(trained, method, capsys):
    from peftfast.cli.demo import greedy
    from peftfast.cli.generate import load_with_adapter

    rc = cli_main(["generate", "--adapter", str(trained[method]), "--prompt", "The small", "--max-new-tokens", "12"])
    assert rc == 0
    text = capsys.readouterr().out[:-1]  # print() adds one newline
    loaded = load_with_adapter(None, str(trained[method]), None)
    assert loaded["load_in_4bit"] == (method == "qlora")  # as trained, from train_log.json
    # greedy() runs the full sequence every step (no KV cache): the cached generate path must agree
    want = greedy(loaded["model"], "The small", 12)[len("The small"):]
    assert text == want[: len(text)] and len(text) > 0


def test_generate_sampling_and_chat(trained, capsys):
    from peftfast.cli.generate import main as gen_main

    a = gen_main(["--adapter", str(trained["lora"]), "--prompt", "x", "--temperature", "1.0", "--seed", "1",
                  "--max-new-tokens", "8"])
    b = gen_main(["--adapter", str(trained["lora"]), "--prompt", "x", "--temperature", "1.0", "--seed", "1",
                  "--max-new-tokens", "8"])
    assert a == b  # seeded
    gen_main(["--adapter", str(trained["lora"]), "--prompt", "hi", "--chat", "--max-new-tokens", "4"])


def test_generate_bf16(trained, monkeypatch, capsys):
    """--bf16 (the default on a CUDA GPU with bf16) loads a dense base in bf16 and a 4-bit one computing in
    it; the adapter stays fp32."""
    from peftfast.cli import basemodel, generate
    from peftfast.layers import AdapterLayer

    for method in ("lora", "qlora"):
        model = generate.load_with_adapter(None, str(trained[method]), None, "cpu", torch.bfloat16)["model"]
        layer = next(m for m in model.modules() if isinstance(m, AdapterLayer))
        if method == "lora":
            assert layer.base_layer.weight.dtype == torch.bfloat16
        else:
            assert layer.base_layer.compute_dtype == torch.bfloat16
        assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    seen = []
    real = generate.load_with_adapter
    monkeypatch.setattr(generate, "load_with_adapter", lambda *a: seen.append(a[-1]) or real(*a))
    monkeypatch.setattr(basemodel, "bf16_by_default", lambda: True)
    args = ["--adapter", str(trained["qlora"]), "--prompt", "The ", "--max-new-tokens", "4"]
    generate.main(args)
    generate.main([*args, "--no-bf16"])
    assert seen == [torch.bfloat16, torch.float32]


def _graph_decode_agrees(trained, compile_mode):
    from peftfast.cli.generate import generate_ids, graph_decode_kwargs, load_with_adapter

    model = load_with_adapter(None, str(trained["lora"]), None)["model"]
    ids = [256, *b"The small"]
    eager = generate_ids(model, ids, 10, None, 0)
    kwargs = graph_decode_kwargs(compile_mode, all_devices=True) if compile_mode else {"cache_implementation": "static"}
    assert generate_ids(model, ids, 10, None, 0, decode_kwargs=kwargs) == eager
    assert len(eager) == 10


def test_static_cache_decode_matches_the_dynamic_one(trained):
    """The CUDA-graph decode's precondition: a static KV cache (fixed shapes and addresses) through the
    patched model gives the tokens of the default cache."""
    _graph_decode_agrees(trained, None)


@pytest.mark.slow
def test_compiled_decode_matches_eager(trained):
    """The decode step compiled whole (fullgraph, as the CUDA-graph path compiles it; here in the default mode
    on a CPU, where no graph is captured) gives the eager tokens."""
    _graph_decode_agrees(trained, "default")


def test_cuda_graphs_flag(trained, capsys):
    from peftfast.cli.generate import load_with_adapter, use_cuda_graphs

    lora = load_with_adapter(None, str(trained["lora"]), None)["model"]
    prefix = load_with_adapter(None, str(trained["prefix"]), None)["model"]
    assert use_cuda_graphs(lora, "cuda", None) and not use_cuda_graphs(lora, "cpu", None)
    assert not use_cuda_graphs(lora, "cuda", False) and not use_cuda_graphs(prefix, "cuda", None)
    for adapter, why in ((trained["lora"], "needs a CUDA GPU"), (trained["prefix"], "prompt-learning")):
        assert cli_main(["generate", "--adapter", str(adapter), "--prompt", "x", "--cuda-graphs"]) == 2
        assert why in capsys.readouterr().err


def test_generate_errors(trained, tmp_path, capsys):
    assert cli_main(["generate", "--adapter", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no such directory" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (foreign / f).write_bytes((trained["lora"] / f).read_bytes())
    cfg = json.loads((foreign / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/trained/elsewhere/base"
    (foreign / "adapter_config.json").write_text(json.dumps(cfg))
    assert cli_main(["generate", "--adapter", str(foreign), "--prompt", "x"]) == 2
    assert "pass --model" in capsys.readouterr().err
    # an embedded base that no longer matches the recorded fingerprint is refused
    log = json.loads((trained["lora"] / "train_log.json").read_text())
    log["base_sha256"] = "0" * 64
    (foreign / "train_log.json").write_text(json.dumps(log))
    cfg["base_model_name_or_path"] = "peftfast:tiny-llama"
    (foreign / "adapter_config.json").write_text(json.dumps(cfg))
    assert cli_main(["generate", "--adapter", str(foreign), "--prompt", "x"]) == 2
    assert "differs from the one this adapter was trained on" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------------

def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("method,dtype", [("qlora", "auto"), ("qlora", "fp32"), ("lora", "auto")])
def test_merge_loads_with_transformers_and_matches(trained, tmp_path, method, dtype):
    from transformers import AutoModelForCausalLM

    from peftfast.cli.generate import load_with_adapter

    out = tmp_path / "merged"
    assert cli_main(["merge", "--adapter", str(trained[method]), "--output", str(out), "--dtype", dtype]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("Linear4bit" in type(m).__name__ for m in merged.modules())
    assert not any("lora" in k for k in merged.state_dict())
    want_dtype = torch.bfloat16 if (method, dtype) == ("qlora", "auto") else torch.float32
    assert merged.dtype == want_dtype
    patched = load_with_adapter(None, str(trained[method]), None)["model"]
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _logits(patched, ids)
    with peftfast.disable_adapters(patched):
        base = _logits(patched, ids)
    assert (ref - base).abs().max() > 0.05  # the adapter matters, so a merge that dropped it would fail
    err = (_logits(merged, ids) - ref).abs().max().item()
    if want_dtype == torch.float32:
        assert err < 1e-4, err
    else:
        # bf16: the error must be what bf16 itself costs, i.e. that of the fp32 merge run in bf16 in memory
        # (the flash-attention rule: at most twice the same-dtype PyTorch error against fp32)
        from peftfast.cli.merging import merged_model

        in_memory = merged_model(None, str(trained[method]), None, "bf16")["model"]
        budget = (_logits(in_memory, ids) - ref).abs().max().item()
        assert err <= 2 * budget + 1e-6, (err, budget)
        assert err < 0.02 * ref.abs().max().item(), err


def test_merge_refuses_prompt_learning_and_busy_output(trained, tmp_path, capsys):
    assert cli_main(["merge", "--adapter", str(trained["prefix"]), "--output", str(tmp_path / "m")]) == 2
    assert "cannot be merged" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert cli_main(["merge", "--adapter", str(trained["lora"]), "--output", str(busy)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (busy / "x").is_file()


def test_merge_module_does_not_shadow_api():
    import peftfast.cli.merging  # noqa: F401

    assert callable(peftfast.merge) and peftfast.merge.__module__ == "peftfast.patching"


# ---------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------

def test_inspect_text_and_json(trained, capsys):
    assert cli_main(["inspect", str(trained["qlora"])]) == 0
    text = capsys.readouterr().out
    for part in ("method:       LORA", "r=8, lora_alpha=16", "parameters:", "size on disk:",
                 "peftfast:tiny-llama", "--method qlora, 4 steps",
                 # all-linear's per-layer paths, one line: each projection with its count of layers
                 "targets:      down_proj (x2), gate_proj (x2), k_proj (x2), o_proj (x2), q_proj (x2), up_proj (x2), "
                 "v_proj (x2)\n"):
        assert part in text, (part, text)
    assert cli_main(["inspect", str(trained["qlora"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    trainable, _ = peftfast.trainable_parameters(_patched_lora())
    assert info["parameters"] == trainable and info["r"] == 8 and info["lora_alpha"] == 16
    assert info["size_on_disk"] > info["weights_size"] > 0
    assert len(info["target_modules"]) == 14  # --json keeps the full paths
    assert cli_main(["inspect", str(trained["prefix"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "PREFIX_TUNING" and info["num_virtual_tokens"] == 4


def _patched_lora():
    from peftfast.cli.basemodel import build_embedded_base

    model = build_embedded_base()
    return peftfast.patch(model, peftfast.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def test_inspect_errors(tmp_path, capsys):
    assert cli_main(["inspect", str(tmp_path)]) == 2
    assert "not an adapter directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Chat data
# ---------------------------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"}]


def test_builtin_chat_template_masks_all_but_assistant():
    ex = chat_example(byte_tokenizer(), CHAT, 512)
    text = bytes(i for i in ex["input_ids"] if i < 256).decode()
    assert text == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nhello\n<|user|>\nbye\n<|assistant|>\nciao\n"
    assert ex["input_ids"][0] == 256  # BOS
    trained = [t for t in ex["labels"] if t != -100]
    assert trained == list(b"hello\n") + [256] + list(b"ciao\n") + [256]
    # labels are the input ids where they are not masked
    assert all(label in (-100, tok) for label, tok in zip(ex["labels"], ex["input_ids"]))


def _chat_model_dir(path):
    """A tiny Llama + a byte-level tokenizer with a ChatML-like chat template, saved with save_pretrained."""
    from tiny import byte_chat_tokenizer, tiny_llama_for

    tok = byte_chat_tokenizer()
    tok.save_pretrained(path)
    tiny_llama_for(tok, intermediate_size=64).save_pretrained(path)
    return path


def test_chat_template_of_hf_tokenizer(tmp_path, capsys):
    from transformers import AutoTokenizer

    model_dir = _chat_model_dir(tmp_path / "model")
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    ex = chat_example(hf_tokenizer(hf), CHAT, 512)
    assert hf.decode(ex["input_ids"]) == hf.apply_chat_template(CHAT, tokenize=False)
    trained = hf.decode([t for t in ex["labels"] if t != -100])
    assert trained == "hello<|im_end|>\nciao<|im_end|>\n"
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(6)) + "\n")
    res = train_main(["--model", str(model_dir), "--data", str(data), "--method", "lora", "--max-steps", "3",
                      "--seq-len", "96", "--batch-size", "2", "--output", str(tmp_path / "out")])
    assert len(res["losses"]) == 3 and all(l == l for l in res["losses"])
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "out"), "--prompt", "hi",
                     "--chat", "--max-new-tokens", "4"]) == 0
    # the adapter records the local base directory, so --model may be left out
    assert cli_main(["generate", "--adapter", str(tmp_path / "out"), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    merged = tmp_path / "merged"
    assert cli_main(["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "out"), "--output", str(merged)]) == 0
    assert (merged / "tokenizer_config.json").is_file()  # the tokenizer travels with the merged model


def _fake_hub_cache(cache, repo_id: str, model_dir) -> None:
    """Put ``model_dir`` in the Hub cache layout huggingface_hub reads offline:
    ``models--owner--name/refs/main`` naming a ``snapshots/<revision>/`` folder."""
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def _cli(args, cwd, cache):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "peftfast", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def test_model_given_as_hub_id(tmp_path):
    """--model takes a Hub id (here served from the Hub cache, offline), and the adapter records it, so
    generate finds the base by itself; an id the Hub cannot give, or a path that is no id, is refused."""
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "peftfast-test/tiny-chat", _chat_model_dir(tmp_path / "model"))
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(6)) + "\n")
    run = _cli(["train", "--model", "peftfast-test/tiny-chat", "--data", str(data), "--method", "lora",
                "--max-steps", "2", "--seq-len", "96", "--batch-size", "2", "--output", "out"], tmp_path, cache)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "peftfast-test/tiny-chat"
    gen = _cli(["generate", "--adapter", "out", "--prompt", "hi", "--max-new-tokens", "2"], tmp_path, cache)
    assert gen.returncode == 0, gen.stderr[-2000:]
    tune = _cli(["tune", "--model", "peftfast-test/tiny-chat", "--dry-run", "--batch-tokens", "8"], tmp_path, cache)
    assert tune.returncode == 0 and "peftfast-test/tiny-chat (Hugging Face Hub)" in tune.stdout, tune.stderr[-2000:]

    missing = _cli(["train", "--model", "peftfast-test/no-such-model", "--output", "o2"], tmp_path, cache)
    assert missing.returncode == 2
    assert "--model peftfast-test/no-such-model: not a local directory, and not loadable from the Hugging Face Hub" \
        in missing.stderr
    assert not (tmp_path / "o2").exists()
    not_an_id = _cli(["generate", "--model", "./no/such/dir", "--adapter", "out", "--prompt", "x"], tmp_path, cache)
    assert not_an_id.returncode == 2 and "not a Hugging Face Hub model id" in not_an_id.stderr


@pytest.mark.parametrize("line,message", [
    ({"messages": []}, "non-empty list"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "has role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
])
def test_malformed_messages_name_the_line(tmp_path, line, message):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=rf"chat\.jsonl:2: .*{message}"):
        load_dataset(f, byte_tokenizer(), 64)


def test_chat_training_on_embedded_base(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(8)) + "\n")
    res = train_main(["--data", str(data), "--method", "lora", "--max-steps", "3", "--seq-len", "128",
                      "--batch-size", "4", "--output", str(tmp_path / "o")])
    assert len(res["losses"]) == 3


def test_merge_4bit_holds_one_fp32_layer_at_a_time_and_equals_the_whole_model_merge(trained, monkeypatch):
    """The 4-bit merge goes layer by layer (dequantize to fp32, merge, cast) and gives bit for bit what
    dequantizing the whole model to fp32, merging and casting gives, with one fp32 layer held at a time."""
    import torch.nn as nn

    from peftfast.cli.generate import load_with_adapter
    from peftfast.layers import LoraLayer
    from peftfast.cli.merging import dequantize_4bit_layers, merged_model

    peak = []
    real_merge = LoraLayer.merge

    def merge_and_count(self, *a, **k):
        if isinstance(self.base_layer, nn.Linear) and not self.merged:  # a layer being merged (unpatch's
            # later merge call finds them all merged): how many fp32 dense copies of 4-bit layers exist now
            peak.append(sum(isinstance(m.base_layer, nn.Linear) and m.base_layer.weight.dtype == torch.float32
                            for m in held[0].modules() if isinstance(m, LoraLayer)))
        real_merge(self, *a, **k)

    held = []
    real_load = load_with_adapter

    def load_and_hold(*a, **k):
        loaded = real_load(*a, **k)
        held.append(loaded["model"])
        return loaded

    monkeypatch.setattr("peftfast.cli.generate.load_with_adapter", load_and_hold)
    monkeypatch.setattr(LoraLayer, "merge", merge_and_count)
    layered = merged_model(None, str(trained["qlora"]), None, "bf16")["model"]
    assert peak == [1] * 14, peak  # 7 projections x 2 decoder layers, one fp32 copy at a time
    monkeypatch.undo()

    whole = real_load(None, str(trained["qlora"]), None)["model"]
    dequantize_4bit_layers(whole, torch.float32)
    peftfast.unpatch(whole, merge_adapters=True)
    whole.to(torch.bfloat16)
    a, b = layered.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_merge_dense_bf16_base_loads_in_bf16_and_equals_the_fp32_merge(tmp_path, monkeypatch):
    """A bf16 checkpoint merged into its own dtype is loaded in bf16 (half the memory of an fp32 load) and
    gives bit for bit the fp32-load merge rounded to bf16 at the end: the merge adds the update in fp32 and
    rounds once either way."""
    from peftfast.cli.generate import load_with_adapter
    from peftfast.cli.merging import merged_model
    from tiny import byte_chat_tokenizer, tiny_llama_for

    model_dir = tmp_path / "base"
    tok = byte_chat_tokenizer()
    tok.save_pretrained(model_dir)
    tiny_llama_for(tok, intermediate_size=64).to(torch.bfloat16).save_pretrained(model_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} " * 3}) + "\n" for i in range(8)))
    for method in ("lora", "dora", "ia3"):
        adapter = tmp_path / method
        train_main(["--model", str(model_dir), "--data", str(data), "--method", method, "--max-steps", "2",
                    "--lr", "1e-2", "--output", str(adapter), *FAST])
        seen = []
        monkeypatch.setattr("peftfast.cli.generate.load_with_adapter",
                            lambda *a: seen.append(a[-1]) or load_with_adapter(*a))
        merged = merged_model(str(model_dir), str(adapter), None, "auto")["model"]
        monkeypatch.undo()
        assert seen == ["auto"] and merged.dtype == torch.bfloat16
        ref = load_with_adapter(str(model_dir), str(adapter), None)["model"]  # fp32 load
        peftfast.unpatch(ref, merge_adapters=True)
        ref.to(torch.bfloat16)
        a, b = merged.state_dict(), ref.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (method, k)
        base = type(ref).from_pretrained(str(model_dir)).state_dict()
        assert any(not torch.equal(a[k], base[k]) for k in a), f"{method}: the merge changed nothing"


def test_library_refusals_are_one_error_line_and_exit_2(tmp_path, capsys):
    """A refusal raised inside the library (here: merging a lora_bias adapter into a base without bias, or an
    adapter training token ids the base does not have) reaches the CLI user as one line, not a traceback."""
    from peftfast.cli.basemodel import build_embedded_base

    model = build_embedded_base()
    with pytest.warns(UserWarning, match="lora_bias"):
        peftfast.patch(model, peftfast.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    biased = tmp_path / "biased"
    peftfast.save_adapter(model, biased)
    out = tmp_path / "merged"
    assert cli_main(["merge", "--adapter", str(biased), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftfast merge: error: ") and "lora_bias" in err and err.count("\n") == 1, err
    assert not out.exists()

    model = build_embedded_base()
    peftfast.patch(model, peftfast.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 5]))
    tokens = tmp_path / "tokens"
    peftfast.save_adapter(model, tokens)
    cfg = json.loads((tokens / "adapter_config.json").read_text())
    cfg["trainable_token_indices"] = [3, 10 ** 6]  # an id past the embedded base's vocabulary
    (tokens / "adapter_config.json").write_text(json.dumps(cfg))
    assert cli_main(["generate", "--adapter", str(tokens), "--prompt", "x", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftfast generate: error: ") and "trainable_token_indices" in err, err
