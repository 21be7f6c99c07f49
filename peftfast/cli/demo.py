"""The embedded main job: QLoRA fine-tuning of a tiny Llama on a text shipped with peftfast.

Nothing is downloaded: the model is built from a config, the tokenizer is UTF-8 bytes, and the corpus
is ``peftfast/data/corpus.txt``. Steps: quantize the base to NF4 with bitsandbytes, patch LoRA into
every linear layer, train, save the adapter in PEFT's format, reload it into a fresh 4-bit base and
check that the logits match.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from .data import BYTE_BOS, byte_tokenizer

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus.txt"  # peftfast/data/, shipped as package data
BOS = BYTE_BOS
_TOKENIZER = byte_tokenizer()


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=257, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=BOS, eos_token_id=BOS, pad_token_id=BOS,
        tie_word_embeddings=False,
    )


def load_4bit_base(model_dir: str):
    """Load a saved model with its linear layers quantized to NF4 (nested absmax), on CPU, kept in the
    layout it was loaded in (see peftfast.layers.base_weight.keep_4bit_layout)."""
    from transformers import AutoModelForCausalLM

    from .basemodel import quant_config
    from ..layers.base_weight import keep_4bit_layout

    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant_config(torch.float32),
                                                 device_map="cpu")
    keep_4bit_layout(model)
    return model


def batches(ids: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=generator)
        yield torch.stack([ids[s: s + seq] for s in starts.tolist()])


@torch.no_grad()
def greedy(model, prompt: str, n: int) -> str:
    ids = torch.tensor([_TOKENIZER.encode(prompt, True)])
    for _ in range(n):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return _TOKENIZER.decode(ids[0, 1:].tolist())


def run_demo(steps: int = 200, output: str = "out/demo-adapter", seed: int = 0, log_every: int = 20) -> dict:
    """Run the demo and return its figures (losses, max logit difference after reload).

    Args:
        steps: optimizer steps.
        output: where the adapter is saved (PEFT format).
        seed: RNG seed for the model and the batches.
        log_every: print the loss every this many steps.

    Returns:
        A dict with ``losses``, ``max_abs_diff`` and ``adapter_dir``.

    Example:
        >>> run_demo(steps=10)  # doctest: +SKIP
    """
    import peftfast
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    t0 = time.time()
    torch.manual_seed(seed)
    text = CORPUS.read_text(encoding="utf-8")
    ids = torch.tensor(_TOKENIZER.encode(text, True))
    with tempfile.TemporaryDirectory() as base_dir:
        LlamaForCausalLM(tiny_llama_config()).save_pretrained(base_dir)
        model = load_4bit_base(base_dir)
        print(f"base: tiny Llama, {len(model.model.layers)} layers, linear layers in NF4 (bitsandbytes), "
              f"{len(text):,} bytes of text")
        peftfast.patch(model, peftfast.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
        peftfast.print_trainable_parameters(model)
        prompt = "The small model"
        print(f"before: {greedy(model, prompt, 40)!r}")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        model.train()
        for step, batch in zip(range(1, steps + 1), batches(ids, 8, 64, gen)):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step == 1 or step % log_every == 0 or step == steps:
                print(f"step {step:4d}  loss {loss.item():.4f}")
        model.eval()
        print(f"after:  {greedy(model, prompt, 40)!r}")
        peftfast.save_adapter(model, output)
        print(f"adapter saved to {output} ({sum(f.stat().st_size for f in Path(output).iterdir()) / 1024:.0f} KiB, PEFT format)")

        fresh = load_4bit_base(base_dir)
        peftfast.load_adapter(fresh, output)
        probe = ids[:64].unsqueeze(0)
        with torch.no_grad():
            diff = (model(probe).logits - fresh(probe).logits).abs().max().item()
        print(f"reloaded into a fresh 4-bit base: max |logit difference| = {diff:.2e} "
              f"({'match' if diff < 1e-4 else 'MISMATCH'})")
    print(f"done in {time.time() - t0:.1f} s")
    return {"losses": losses, "max_abs_diff": diff, "adapter_dir": os.path.abspath(output)}
