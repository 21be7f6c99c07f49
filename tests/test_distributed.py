"""Multi-process CPU training with the gloo backend: DDP (dense and 4-bit NF4 base) and FSDP2.

Each test launches 2 worker subprocesses (this file, run as a script) that train a LoRA-patched tiny
Llama on half of a fixed global batch each; the test process trains the same model on the whole batch
and compares adapter weights and per-step losses. Every subprocess has a hard timeout so nothing hangs.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

WORLD = 2
STEPS = 3
LR = 1e-2
GLOBAL_BATCH, SEQ = 4, 12
TIMEOUT_S = 50


def _build(quant: bool):
    import peftfast

    model = _build_base(quant)
    torch.manual_seed(1)
    peftfast.patch(model, peftfast.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False))
    return model


def _data():
    g = torch.Generator().manual_seed(123)
    batch = torch.randint(1, 64, (GLOBAL_BATCH, SEQ), generator=g)
    eval_ids = torch.randint(1, 64, (2, SEQ), generator=g)
    return batch, eval_ids


def _lora_state(model) -> dict:
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[n.replace("module.", "").replace("_fsdp_wrapped_module.", "")] = t.detach().clone()
    return out


def _reference(quant: bool):
    model = _build(quant)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    batch, _ = _data()
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, _lora_state(model), losses


def _worker(rank: int, port: int, mode: str, outdir: str) -> None:
    import datetime

    import torch.distributed as dist

    import peftfast

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        quant = {"ddp4bit": True, "fsdp4bit": "bf16"}.get(mode, False)
        model = _build(quant)
        if mode == "zero3":
            return _zero3_worker(rank, model, outdir)
        if mode.startswith("fsdp"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            wrapped = model
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model)
        opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
        batch, eval_ids = _data()
        half = GLOBAL_BATCH // WORLD
        local = batch[rank * half:(rank + 1) * half]
        losses = []
        for _ in range(STEPS):
            loss = wrapped(input_ids=local, labels=local).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            g = loss.detach().clone()
            dist.all_reduce(g)
            losses.append(g.item() / WORLD)
        lora = _lora_state(model)
        result = {"losses": losses, "lora": lora}
        if quant == "bf16":  # evidence that FSDP really sharded the packed 4-bit weights
            w = model.model.layers[0].self_attn.k_proj.weight
            result["k_proj_weight"] = (type(w).__name__, str(w.dtype), hasattr(w, "full_tensor"))
        if not mode.startswith("fsdp"):
            with torch.no_grad():
                trained_logits = model(input_ids=eval_ids).logits
            adapter_dir = os.path.join(outdir, "adapter")
            if rank == 0:
                peftfast.save_adapter(model, adapter_dir)
            dist.barrier()
            fresh = _build_base(quant)
            peftfast.load_adapter(fresh, adapter_dir)
            with torch.no_grad():
                result["loaded_logits"] = fresh(input_ids=eval_ids).logits
            result["trained_logits"] = trained_logits
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _zero3_worker(rank: int, model, outdir: str) -> None:
    """DeepSpeed ZeRO-3 on its CPU accelerator: every parameter partitioned across the 2 ranks."""
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the package's `torch` attribute is torch itself)
    import torch.distributed as dist

    ds_torch_comm = sys.modules["deepspeed.comm.torch"]
    # The CPU accelerator JIT-compiles a shared-memory all-reduce (a C++ build of a minute or more);
    # gloo, already initialized here, does the same job for a test.
    ds_torch_comm.build_shm_op = lambda: None
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(WORLD))  # what torchrun would set
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // WORLD,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                   "weight_decay": 0.01, "torch_adam": True}},
    }
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    base_weight = model.model.layers[0].self_attn.q_proj.base_layer.weight
    partitioned = hasattr(base_weight, "ds_id") and base_weight.numel() == 0
    batch, _ = _data()
    half = GLOBAL_BATCH // WORLD
    local = batch[rank * half:(rank + 1) * half]
    losses = []
    for _ in range(STEPS):
        loss = engine(input_ids=local, labels=local).loss
        engine.backward(loss)
        engine.step()
        g = loss.detach().clone()
        dist.all_reduce(g)
        losses.append(g.item() / WORLD)
    lora = {}
    for n, p in model.named_parameters():
        if "lora_" in n:
            with deepspeed.zero.GatheredParameters([p]):
                lora[n] = p.detach().clone()
    torch.save({"losses": losses, "lora": lora, "partitioned": partitioned}, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()


def _build_base(quant):
    """quant: False (dense), True (NF4, uint8 storage) or "bf16" (NF4 packed into bfloat16 storage, the
    FSDP-QLoRA layout: the 4-bit weights shard with the rest of a wrap unit)."""
    from tiny import tiny_llama

    model = tiny_llama(seed=0)
    if quant:
        from models import quantize_4bit

        storage = torch.bfloat16 if quant == "bf16" else torch.uint8
        quantize_4bit(model, quant_type="nf4", nested=True, quant_storage=storage, skip=("lm_head",))
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, outdir: Path) -> list:
    env = dict(os.environ, PEFTFAST_BACKEND="reference", TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), mode, str(outdir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{mode} workers timed out after {TIMEOUT_S}s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-4000:]}"
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _check(mode: str, tmp_path: Path, quant: bool) -> None:
    from helpers import rel_err

    results = _launch(mode, tmp_path)
    if quant == "bf16":
        assert results[0]["k_proj_weight"] == ("DTensor", "torch.bfloat16", True), results[0]["k_proj_weight"]
    ref_model, ref_lora, ref_losses = _reference(quant)
    assert len(ref_lora) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for r, res in enumerate(results):
        assert res["lora"].keys() == ref_lora.keys()
        for k in ref_lora:
            assert not torch.equal(res["lora"][k], _build_lora_init(quant)[k]), f"{k} did not train"
            err = rel_err(res["lora"][k], ref_lora[k])
            assert err < 1e-5, f"rank {r} {k}: rel err {err:.2e}"
        for a, b in zip(res["losses"], ref_losses):
            assert abs(a - b) <= 1e-5 * abs(b), (res["losses"], ref_losses)
    if "loaded_logits" in results[0]:
        rank0 = results[0]["trained_logits"]
        for r, res in enumerate(results):
            err = rel_err(res["loaded_logits"], rank0)
            assert err < 1e-6, f"rank {r} loaded adapter: logits rel err {err:.2e}"
        _, eval_ids = _data()
        with torch.no_grad():
            ref_logits = ref_model(input_ids=eval_ids).logits
        assert rel_err(rank0, ref_logits) < 1e-5


_INIT_CACHE: dict = {}


def _build_lora_init(quant: bool) -> dict:
    if quant not in _INIT_CACHE:
        _INIT_CACHE[quant] = _lora_state(_build(quant))
    return _INIT_CACHE[quant]


def test_ddp_lora_matches_single_process(tmp_path):
    _check("ddp", tmp_path, quant=False)


def test_ddp_lora_4bit_nf4_base_matches_single_process(tmp_path):
    pytest.importorskip("bitsandbytes")
    _check("ddp4bit", tmp_path, quant=True)


def test_fsdp2_lora_matches_single_process(tmp_path):
    _check("fsdp", tmp_path, quant=False)


def test_deepspeed_zero3_lora_matches_single_process(tmp_path):
    """Runs where deepspeed imports (it is not a project dependency; CI skips this test)."""
    pytest.importorskip("deepspeed")
    results = _launch("zero3", tmp_path)
    assert all(r["partitioned"] for r in results), "ZeRO-3 did not partition the base weights"
    _, ref_lora, ref_losses = _reference(False)
    for r, res in enumerate(results):
        assert res["lora"].keys() == ref_lora.keys()
        for k in ref_lora:
            assert rel_err_(res["lora"][k], ref_lora[k]) < 1e-5, f"rank {r} {k}"
        for a, b in zip(res["losses"], ref_losses):
            assert abs(a - b) <= 1e-5 * abs(b), (res["losses"], ref_losses)


def rel_err_(a, b) -> float:
    from helpers import rel_err

    return rel_err(a, b)


def test_fsdp2_qlora_bf16_storage_matches_single_process(tmp_path):
    """FSDP-QLoRA: NF4 weights packed in bfloat16 storage are sharded by fully_shard like any parameter;
    the quant state comes back from the module after the all-gather, and nothing is cast."""
    pytest.importorskip("bitsandbytes")
    _check("fsdp4bit", tmp_path, quant="bf16")


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
