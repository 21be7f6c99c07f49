"""Suite ``e2e_qlora``: QLoRA training of a Llama-3-8B-shaped model, peftfast against PEFT + bitsandbytes.

The model: Llama-3-8B's shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 128256)
with N decoder layers (default 4, ``--e2e-layers``), random weights (built from a ``LlamaConfig``, never
downloaded), bf16, SDPA attention; every decoder linear layer quantized to NF4 with nested absmax by
bitsandbytes (the LM head and embeddings stay bf16, as in QLoRA). LoRA r=16, alpha=32, dropout 0 on all
linear layers; micro-batch 2 x 2048 tokens of the text shipped in ``peftfast/data``; AdamW (lr 1e-4) on
both sides; gradient checkpointing (non-reentrant) off and on.

Both sides start from the same base (same seed) and the same adapter initialisation (PEFT's,
copied into peftfast's parameters), and see the same batches, so their loss curves should agree to
bf16 rounding: 50 steps are run and the largest |loss difference| is reported (and plotted).

    tokens/s = 2 * 2048 * timed steps / seconds        peak memory = torch.cuda.max_memory_allocated
    (whole step: weights, optimizer state, activations) during the timed steps

Targets: >= 2x the tokens/s of PEFT + bitsandbytes, <= 0.5x its peak memory.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch

from bench_common import (LORA_ALPHA, LORA_R, Context, free_memory, headline, import_bnb, import_peft,
                          make_context, measure_ceilings, quantize_nf4, smoke_threads, suite_result, unavailable)

NAME = "e2e_qlora"
FULL = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, layers=4, seq=2048, batch=2,
            loss_steps=50, warmup=2, timed=6)
SMOKE = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=320, layers=2, seq=32, batch=2,
             loss_steps=4, warmup=1, timed=2)
# The headline profile: 2 layers, a 10-step loss curve, gradient checkpointing off only.
HEADLINE = dict(FULL, layers=2, loss_steps=10, warmup=2, timed=4, checkpointing=("off",))
SMOKE_HEADLINE = dict(SMOKE, loss_steps=2, timed=1, checkpointing=("off",))
CHECKPOINTING = ("off", "on")
LR = 1e-4
CORPUS = Path(__file__).resolve().parent.parent / "peftfast" / "data" / "corpus.txt"


def llama_config(cfg: dict):
    from transformers import LlamaConfig

    c = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=max(8192, cfg["seq"]), rope_theta=500000.0, tie_word_embeddings=False,
        attention_dropout=0.0, use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    c._attn_implementation = "sdpa"
    return c


def build_model(ctx: Context, cfg: dict, seed: int = 0):
    """A random Llama of ``cfg``'s shape in bf16 on ctx.device, decoder linears quantized to NF4 (nested)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    if ctx.cuda:
        torch.cuda.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(ctx.dtype)
    try:
        with torch.device(ctx.device):
            model = LlamaForCausalLM(llama_config(cfg))
    finally:
        torch.set_default_dtype(old)
    model.to(ctx.dtype)
    names = [n for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.model.layers.get_submodule(parent_name)
        lin = getattr(parent, attr)
        q = quantize_nf4(lin.weight.data, ctx.dtype, nested=True)
        setattr(parent, attr, q)
        del lin
    try:
        model.is_loaded_in_4bit = True  # what transformers sets for a bitsandbytes 4-bit model; PEFT reads it
    except AttributeError:  # a read-only property in some transformers versions: already right there
        pass
    model.config.use_cache = False
    free_memory(ctx)
    return model


def batches(cfg: dict, n: int, seed: int = 0):
    """``n`` batches [batch, seq] of byte tokens (< 257) of the shipped corpus, the same for every call."""
    data = torch.tensor(list(CORPUS.read_bytes()), dtype=torch.long) + 3  # keep 0..2 for pad/bos/eos
    need = cfg["seq"] + 1
    if data.numel() < 2 * need:
        data = data.repeat(math.ceil(2 * need / data.numel()))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(0, data.numel() - cfg["seq"], (cfg["batch"],), generator=g)
        out.append(torch.stack([data[s: s + cfg["seq"]] for s in starts.tolist()]))
    return out


def e2e_backend(ctx: Context) -> str:
    return "reference" if ctx.smoke else (ctx.options.get("e2e_backend") or "auto")


def lora_config_kwargs() -> dict:
    return dict(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def set_checkpointing(hf, on: bool) -> None:
    """Non-reentrant activation checkpointing on/off (transformers >= 5.2x renamed the methods)."""
    if hasattr(hf, "activation_checkpointing_enable"):
        if on:
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.activation_checkpointing_disable()
    elif on:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_disable()


def _sync(ctx):
    if ctx.cuda:
        torch.cuda.synchronize()


def _step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def train_side(ctx: Context, cfg: dict, side: str, init_state: Optional[dict] = None) -> dict:
    """Build, adapt (``side`` = "peft" or "peftfast"), run the loss curve, then time with checkpointing off/on."""
    model = build_model(ctx, cfg)
    hf = model
    if side == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**lora_config_kwargs()))
        from peft.utils import get_peft_model_state_dict

        init = {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}
    else:
        import peftfast

        # Full runs use what users get ("auto": Triton on CUDA); smoke runs the reference on CPU.
        peftfast.patch(model, peftfast.LoraConfig(**lora_config_kwargs()), backend=e2e_backend(ctx))
        init = None
        if init_state is not None:
            mine = peftfast.adapter_state_dict(model)
            missing = sorted(set(init_state) ^ set(mine))
            if missing:
                raise RuntimeError(f"adapter keys differ between PEFT and peftfast, e.g. {missing[:3]}")
            with torch.no_grad():
                for key, value in init_state.items():
                    mine[key].copy_(value.to(mine[key].dtype))
    trainable = [p for p in model.parameters() if p.requires_grad]
    info = {"trainable_params": sum(p.numel() for p in trainable),
            "adapter_dtype": str(trainable[0].dtype) if trainable else None}
    model.train()
    opt = torch.optim.AdamW(trainable, lr=LR)
    data = batches(cfg, cfg["loss_steps"])
    losses = []
    for ids in data:
        losses.append(float(_step(model, opt, ids.to(ctx.device)).item()))
    info["losses"] = losses
    runs = {}
    tokens = cfg["batch"] * cfg["seq"]
    for ckpt in (c == "on" for c in cfg.get("checkpointing", CHECKPOINTING)):
        set_checkpointing(hf, ckpt)
        model.train()
        steps = batches(cfg, cfg["warmup"] + cfg["timed"], seed=1)
        try:
            for ids in steps[:cfg["warmup"]]:
                _step(model, opt, ids.to(ctx.device))
            _sync(ctx)
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
            static = torch.cuda.memory_allocated() if ctx.cuda else None
            t0 = time.perf_counter()
            for ids in steps[cfg["warmup"]:]:
                _step(model, opt, ids.to(ctx.device))
            _sync(ctx)
            sec = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() if ctx.cuda else None
            runs["on" if ckpt else "off"] = {
                "tokens_per_s": tokens * cfg["timed"] / sec, "step_ms": 1e3 * sec / cfg["timed"],
                "peak_mem_bytes": peak, "static_mem_bytes": static, "timed_steps": cfg["timed"],
                "timer": "time.perf_counter around the timed steps, synchronized" + (
                    "" if ctx.cuda else " (smoke: not a figure)"),
            }
        except Exception as e:  # noqa: BLE001
            runs["on" if ckpt else "off"] = unavailable(f"error: {type(e).__name__}: {str(e)[:300]}")
    set_checkpointing(hf, False)
    info["runs"] = runs
    del model, hf, opt, trainable
    free_memory(ctx)
    return {"info": info, "init": init}


def sizes(ctx: Context) -> dict:
    """The model and run of this context: full, headline or smoke sizes, then ``--e2e-*`` overrides."""
    if ctx.smoke:
        cfg = dict(SMOKE_HEADLINE if ctx.headline else SMOKE)
    else:
        cfg = dict(HEADLINE if ctx.headline else FULL)
    cfg.setdefault("checkpointing", CHECKPOINTING)
    if ctx.options.get("e2e_layers"):
        cfg["layers"] = int(ctx.options["e2e_layers"])
    if ctx.options.get("e2e_loss_steps"):
        cfg["loss_steps"] = int(ctx.options["e2e_loss_steps"])
    return cfg


@smoke_threads
def run(smoke: Optional[bool] = None, ctx: Optional[Context] = None) -> dict:
    ctx = ctx or make_context(smoke)
    if not ctx.ceilings:
        measure_ceilings(ctx)  # recorded with the results, as in every suite
    cfg = sizes(ctx)
    ctx.begin(NAME, 2)
    bnb, bnb_why = import_bnb()
    peft, peft_why = import_peft()
    sides = {}
    if bnb is None:
        status = f"unavailable: {bnb_why} (the NF4 base is built by bitsandbytes)"
        sides["peft_bnb"] = unavailable(bnb_why)
        sides["peftfast"] = unavailable(bnb_why)
        ctx.tick("skipped")
        ctx.tick("skipped")
    else:
        status = "ok"
        init = None
        if peft is None:
            sides["peft_bnb"] = unavailable(peft_why)
        else:
            try:
                r = train_side(ctx, cfg, "peft")
                sides["peft_bnb"], init = r["info"], r["init"]
            except Exception as e:  # noqa: BLE001
                sides["peft_bnb"] = unavailable(f"error: {type(e).__name__}: {str(e)[:300]}")
            free_memory(ctx)
        ctx.tick("PEFT + bitsandbytes")
        try:
            sides["peftfast"] = train_side(ctx, cfg, "peftfast", init_state=init)["info"]
        except Exception as e:  # noqa: BLE001
            sides["peftfast"] = unavailable(f"error: {type(e).__name__}: {str(e)[:300]}")
        ctx.tick("peftfast")

    cases = []
    ratios = {}
    for ckpt in cfg["checkpointing"]:
        impls = {}
        for side, res in sides.items():
            impls[side] = res["runs"][ckpt] if "runs" in res else res
        ok = all("tokens_per_s" in v for v in impls.values())
        tps = impls["peftfast"]["tokens_per_s"] / impls["peft_bnb"]["tokens_per_s"] if ok else None
        mem = None
        if ok and impls["peftfast"].get("peak_mem_bytes") and impls["peft_bnb"].get("peak_mem_bytes"):
            mem = impls["peftfast"]["peak_mem_bytes"] / impls["peft_bnb"]["peak_mem_bytes"]
        ratios[ckpt] = {"tokens_per_s_vs_peft_bnb": tps, "peak_mem_vs_peft_bnb": mem}
        cases.append({
            "name": f"{cfg['layers']} layers, gradient checkpointing {ckpt}",
            "shape": {"layers": cfg["layers"], "hidden": cfg["hidden"], "intermediate": cfg["intermediate"],
                      "heads": cfg["heads"], "kv_heads": cfg["kv_heads"], "vocab": cfg["vocab"], "seq": cfg["seq"],
                      "micro_batch": cfg["batch"], "r": LORA_R, "gradient_checkpointing": ckpt == "on"},
            "impls": impls, "speedup": {"peft_bnb": tps}, "memory_ratio": {"peft_bnb": mem},
        })
    curves = {side: res.get("losses") for side, res in sides.items() if "losses" in res}
    agreement = None
    if len(curves) == 2:
        a, b = curves["peftfast"], curves["peft_bnb"]
        agreement = {"steps": len(a), "max_abs_diff": max(abs(x - y) for x, y in zip(a, b)),
                     "first_loss": {"peftfast": a[0], "peft_bnb": b[0]},
                     "last_loss": {"peftfast": a[-1], "peft_bnb": b[-1]}}
    heads = []
    for ckpt in cfg["checkpointing"]:
        heads.append(headline(f"tokens/s vs PEFT+bnb (checkpointing {ckpt})", ratios[ckpt]["tokens_per_s_vs_peft_bnb"],
                              "x", target=">= 2x"))
        heads.append(headline(f"peak memory vs PEFT+bnb (checkpointing {ckpt})", ratios[ckpt]["peak_mem_vs_peft_bnb"],
                              "x", target="<= 0.5x"))
    heads.append(headline(f"loss curves, max |diff| over {cfg['loss_steps']} steps",
                          agreement["max_abs_diff"] if agreement else None, ""))
    config = dict(cfg, dtype=str(ctx.dtype), peftfast_backend=e2e_backend(ctx),
                  base="NF4 nested absmax (bitsandbytes), LM head and embeddings bf16",
                  lora=lora_config_kwargs(), optimizer=f"torch.optim.AdamW(lr={LR})", attention="sdpa",
                  checkpointing="non-reentrant", data=f"bytes of {CORPUS.name} (+3), random windows, fixed seeds")
    side_info = {s: {k: v for k, v in r.items() if k not in ("runs",)} for s, r in sides.items()}
    return suite_result(NAME, ctx, cases, config=config, headline=heads, status=status,
                        extra={"loss_curves": curves, "loss_agreement": agreement, "sides": side_info})
