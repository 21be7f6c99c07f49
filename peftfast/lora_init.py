"""LoRA initializations computed from the base weight (PiSSA, OLoRA, LoftQ), their exact undo, and the
conversion of such an adapter into a plain LoRA adapter for the original base.

Both methods split the base weight ``W`` [N, K] into a principal part carried by the adapter and a
residual left in the base: ``lora_A``, ``lora_B`` from a decomposition of ``W``, and the base becomes
``W_res = W - scaling * B @ A``, so the patched model computes exactly what the original did before
training. The arithmetic follows Hugging Face PEFT's ``LoraLayer.pissa_init`` / ``olora_init`` operation
for operation (same decompositions, same expression order, A and B rounded through a half-precision base's
dtype as PEFT's device/dtype move does), so the same base and config give the same bits:

* ``"pissa"``: full SVD ``W = V S U^T``; ``A = diag(sqrt(S_r / s)) U_r^T``, ``B = V_r diag(sqrt(S_r / s))``.
* ``"pissa_niter_<n>"``: the same from ``torch.svd_lowrank(W, r, niter=n)`` (random: it draws from the
  global RNG, so seeding the same way as for PEFT gives the same draws).
* ``"olora"``: QR ``W = Q R``; ``B = Q[:, :r]``, ``A = R[:r]``. On a bitsandbytes 4-bit base, ``W`` is the
  decoded weight and ``W_res`` is requantized (from float32, as PEFT does).
* ``"loftq"`` (with ``loftq_config={"loftq_bits": 4, "loftq_iter": T}``): PEFT's ``loftq_init`` on a 16/32-bit
  base (:func:`loftq_decompose`). The base does not keep a residual: it becomes ``deq(Q)``, the NF4
  quantization of the last ``W - B A`` (bitsandbytes' blockwise NF4, blocksize 64, no nested scales),
  dequantized and stored dense in the base's dtype, exactly what PEFT leaves there; quantizing that base to
  4-bit afterwards (bitsandbytes, same settings) gives back ``Q``. As in PEFT, the scaling is *not* folded in:
  ``B A`` approximates ``W - deq(Q)``, so the patched model starts at ``deq(Q) + scaling * B A``, which is the
  LoftQ approximation of ``W`` only when ``scaling == 1`` (``lora_alpha == r``); config validation warns
  otherwise. :func:`replace_lora_weights_loftq` is PEFT's one-shot variant for a base that is 4-bit already.

The base is changed, so the weight it replaced is kept (on the CPU, where the model is on an accelerator)
until ``unpatch`` or a failed ``patch`` puts it back bit for bit (:func:`restore_base`).

:func:`convert_to_lora` is PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``:
with the adapter as it was initialized (``A0``, ``B0``) and as trained (``A``, ``B``),
``delta W = s (B A - B0 A0) = s [B | -B0] [A ; A0]``, a rank-2r LoRA adapter for the *original* base.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn as nn

from .checkpoint_keys import saved_param
from .config import ConfigError

_NITER = re.compile(r"pissa_niter_(-?\d+)$")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# PEFT's other initializations, refused by name (each needs data or machinery peftfast does not have)
_OTHER_INITS = ("corda", "eva", "orthogonal", "mica", "lora_ga")
# PEFT's loftq_init quantizes with bnb.nn.Params4bit's defaults (blocksize 64) and compress_statistics=False
LOFTQ_BLOCKSIZE = 64


def parse_init(value) -> Optional[tuple]:
    """``("pissa", None)``, ``("pissa", niter)``, ``("olora", None)`` or ``("loftq", None)`` for the base-weight
    inits; None for the others (True, False, "gaussian").

    Raises:
        ConfigError: a value PEFT does not know, or one of PEFT's inits that peftfast does not implement.
    """
    if value is True or value is False or value == "gaussian":
        return None
    if isinstance(value, str):
        if value == "pissa":
            return ("pissa", None)
        m = _NITER.match(value)
        if m:
            niter = int(m.group(1))
            if niter < 0:
                raise ConfigError(f"init_lora_weights={value!r}: the number of subspace iterations must be >= 0 "
                                  "(e.g. 'pissa_niter_4')")
            return ("pissa", niter)
        if value.lower() == "olora":  # PEFT compares this one case-insensitively
            return ("olora", None)
        if value == "loftq":  # PEFT compares this one exactly
            return ("loftq", None)
        if value.lower() in _OTHER_INITS:
            raise ConfigError(f"init_lora_weights={value!r} is not implemented in peftfast (it needs data or "
                              "machinery beyond the base weights); use True, 'gaussian', 'pissa', "
                              "'pissa_niter_<n>', 'olora' or 'loftq', or Hugging Face PEFT for this adapter")
    raise ConfigError(f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_<n>', 'olora' or "
                      f"'loftq', got {value!r}")


def check_loftq_config(init, loftq_config) -> dict:
    """PEFT's ``loftq_config`` rules, as a plain dict: required (4-bit, >= 1 iteration) with ``"loftq"``.

    Args:
        init: the config's ``init_lora_weights``.
        loftq_config: a dict, a ``LoftQConfig`` (PEFT's or anything with ``loftq_bits``/``loftq_iter``), or None.

    Returns:
        ``{"loftq_bits": 4, "loftq_iter": T}`` for ``"loftq"``; ``{}`` otherwise (PEFT drops it, with a warning).

    Raises:
        ConfigError: missing or malformed for ``"loftq"``, or 8-bit (not implemented in peftfast).
    """
    if loftq_config is not None and not isinstance(loftq_config, dict):
        if not hasattr(loftq_config, "loftq_bits"):
            raise ConfigError(f"loftq_config must be a dict or a LoftQConfig, got {type(loftq_config).__name__}")
        loftq_config = dict(vars(loftq_config))
    if init != "loftq":
        if loftq_config:
            import warnings

            warnings.warn("loftq_config is ignored when init_lora_weights is not 'loftq' (as in PEFT)", stacklevel=4)
        return {}
    if not loftq_config:
        raise ConfigError("init_lora_weights='loftq' needs loftq_config, e.g. loftq_config={'loftq_bits': 4, "
                          "'loftq_iter': 1} (PEFT's LoftQConfig(loftq_bits=4, loftq_iter=1))")
    unknown = sorted(set(loftq_config) - {"loftq_bits", "loftq_iter"})
    if unknown:
        raise ConfigError(f"loftq_config has unknown fields {unknown}; PEFT's LoftQConfig has loftq_bits and loftq_iter")
    out = {"loftq_bits": loftq_config.get("loftq_bits", 4), "loftq_iter": loftq_config.get("loftq_iter", 1)}
    bits, iters = out["loftq_bits"], out["loftq_iter"]
    if bits == 8 and not isinstance(bits, bool):
        raise ConfigError("loftq_config loftq_bits=8 (LoftQ for an int8 base) is not implemented in peftfast; "
                          "use loftq_bits=4 (NF4), or Hugging Face PEFT for 8-bit LoftQ")
    if bits != 4 or isinstance(bits, bool):
        raise ConfigError(f"loftq_config loftq_bits must be 4 (NF4; PEFT also has 8), got {bits!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ConfigError(f"loftq_config loftq_iter must be an integer >= 1 (alternating steps), got {iters!r}")
    return out


def is_base_init(value) -> bool:
    """Whether ``init_lora_weights=value`` computes the adapter from the base weight (and changes the base)."""
    try:
        return parse_init(value) is not None
    except ConfigError:
        return False


def check_base_init(layer: nn.Module, init, r: int) -> None:
    """Refuse a PiSSA/OLoRA init this layer's base cannot take, before anything changes (PEFT's refusals,
    and the cases where PEFT would silently produce a wrong adapter)."""
    from .layers.base_weight import is_8bit, is_zero3_partitioned, stores_transposed
    from .kernels.nf4 import is_4bit_weight

    method, _ = parse_init(init)
    base = layer.base_layer
    w = base.weight
    kind = type(base).__name__
    if is_zero3_partitioned(w):
        raise ConfigError(f"init_lora_weights={init!r} needs the whole base weight, but this {kind} is a DeepSpeed "
                          "ZeRO-3 shard; initialize before partitioning (or use ZeRO-2 / FSDP2)")
    if is_8bit(base):
        raise ConfigError(f"init_lora_weights={init!r} on a bitsandbytes 8-bit base is not implemented in peftfast; "
                          "initialize on the 16/32-bit (or 4-bit, OLoRA) base")
    if method == "loftq":
        _check_loftq_base(layer, init, w, kind)
    elif is_4bit_weight(w):
        if method == "pissa":
            raise ConfigError(f"init_lora_weights={init!r} on a bitsandbytes 4-bit base is refused (as PEFT does: "
                              "'Please initialize PiSSA under float32, float16, or bfloat16'): run PiSSA on the "
                              "16/32-bit model, then quantize the residual model it leaves")
    elif w.dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"init_lora_weights={init!r} needs a float32, float16 or bfloat16 base weight (as PEFT); "
                          f"this {kind}'s is {w.dtype}")
    if method == "olora" and stores_transposed(base):
        # PEFT's olora_init decomposes the stored [in, out] weight as if it were [out, in]: the adapter then has
        # the wrong shape (its forward fails) or, for a square layer, the wrong values.
        raise ConfigError(f"init_lora_weights='olora' on a transformers Conv1D (fan_in_fan_out, GPT-2 style) is "
                          "refused: PEFT's OLoRA ignores fan_in_fan_out there and builds a wrong adapter; use "
                          "'pissa' (which handles it) or leave Conv1D layers out of target_modules")
    limit = min(layer.in_features, layer.out_features)
    if r > limit:
        raise ConfigError(f"init_lora_weights={init!r} with rank {r} on a {layer.out_features}x{layer.in_features} "
                          f"{kind}: the decomposition has at most {limit} components (PEFT would silently make a "
                          f"rank-{limit} adapter); choose r <= {limit} (rank_pattern can set it for this layer)")


def _check_loftq_base(layer: nn.Module, init, w, kind: str) -> None:
    from .layers.base_weight import stores_transposed
    from .kernels.nf4 import is_4bit_weight

    if is_4bit_weight(w):
        raise ConfigError(
            f"init_lora_weights='loftq' needs the 16/32-bit weights, but this {kind} is bitsandbytes 4-bit already "
            "(PEFT: 'you should not pass a quantized model in this case, as LoftQ will quantize the model itself'). "
            "Patch the 16/32-bit model (its base becomes the LoftQ-quantized weight), or patch this 4-bit model with "
            "init_lora_weights=True and call peftfast.replace_lora_weights_loftq(model, original_weights). "
            "To load a trained LoftQ adapter onto its saved 4-bit base, set init_lora_weights to true in its "
            "adapter_config.json, as PEFT's LoftQ example does"
        )
    if w.dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"init_lora_weights={init!r} needs a float32, float16 or bfloat16 base weight (as PEFT); "
                          f"this {kind}'s is {w.dtype}")
    if stores_transposed(layer.base_layer):
        # PEFT's loftq_init decomposes the stored [in, out] weight as if it were [out, in] (wrong adapter shapes)
        raise ConfigError("init_lora_weights='loftq' on a transformers Conv1D (fan_in_fan_out, GPT-2 style) is "
                          "refused: PEFT's LoftQ ignores fan_in_fan_out and builds a wrong adapter; leave Conv1D "
                          "layers out of target_modules")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ConfigError("init_lora_weights='loftq' quantizes with bitsandbytes' NF4, which is not installed "
                          "(pip install bitsandbytes)") from e


def nf4_roundtrip(x: torch.Tensor, blocksize: int = LOFTQ_BLOCKSIZE) -> torch.Tensor:
    """``deq(Q(x))``: bitsandbytes' blockwise NF4 quantization of the float32 ``x`` (no nested scales, as
    PEFT's LoftQ), decoded with bitsandbytes' own arithmetic (fp32 ``code * absmax``) by peftfast's
    reference decoder, which reads the standard layout on every device.

    Args:
        x: float32 [N, K], on the CPU or a CUDA device (bitsandbytes quantizes there).
        blocksize: bitsandbytes' blocksize.

    Returns:
        float32 [N, K].
    """
    import types

    import bitsandbytes as bnb

    from .kernels.nf4 import dequantize_4bit_reference, quant4bit_view

    packed, state = bnb.functional.quantize_4bit(x.contiguous(), blocksize=blocksize, compress_statistics=False,
                                                 quant_type="nf4")
    return dequantize_4bit_reference(quant4bit_view(types.SimpleNamespace(data=packed, quant_state=state)),
                                     torch.float32)


def _svd_factors(res: torch.Tensor, r: int) -> tuple:
    """``(A, B)`` = ``(sqrt(S_r) Vh_r, U_r sqrt(S_r))`` of ``res``, in PEFT's ``_low_rank_decomposition``'s
    operations (products with the diagonal matrix, which are exact: every other term is 0)."""
    u, s, vh = torch.linalg.svd(res, full_matrices=False)
    return torch.sqrt(torch.diag(s)[:r, :]) @ vh, u @ torch.sqrt(torch.diag(s)[:, :r])


@torch.no_grad()
def loftq_decompose(weight: torch.Tensor, r: int, num_iter: int, blocksize: int = LOFTQ_BLOCKSIZE) -> tuple:
    """LoftQ (Li et al. 2023, Algorithm 1) as PEFT's ``loftq_init`` computes it, on ``weight``'s device.

    ``res = W``; ``num_iter`` times: ``D = deq(NF4(res))``, ``(A, B)`` = rank-``r`` SVD factors of ``W - D``,
    then (but for the last) ``res = W - B A``. The scaling does not enter (PEFT's convention).

    Args:
        weight: the [N, K] weight (any float dtype; computed in float32).
        r: the LoRA rank (<= min(N, K)).
        num_iter: alternating steps (``loftq_iter``), >= 1.
        blocksize: NF4 blocksize (PEFT: 64).

    Returns:
        ``(D, A, B)`` in float32: the dequantized base [N, K], ``lora_A`` [r, K], ``lora_B`` [N, r].

    Example:
        >>> d, a, b = loftq_decompose(torch.randn(48, 32), r=4, num_iter=2)  # doctest: +SKIP
    """
    w = weight.to(torch.float32)
    res = w.clone()
    for i in range(num_iter):
        deq = nf4_roundtrip(res, blocksize)
        a, b = _svd_factors(w - deq, r)
        if i + 1 == num_iter:
            break
        res = w - torch.mm(b, a)
    return deq, a, b


def _decompose(w: torch.Tensor, method: str, niter: Optional[int], r: int, scaling: float) -> tuple:
    """``(A, B)`` in float32 from the float32 weight ``w`` [N, K], as PEFT computes them."""
    if method == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    if niter is None:
        v, s, uh = torch.linalg.svd(w, full_matrices=False)
        vr, sr, uhr = v[:, :r], s[:r] / scaling, uh[:r]
    else:
        vr, sr, ur = torch.svd_lowrank(w, r, niter=niter)
        sr, uhr = sr / scaling, ur.t()
    return torch.diag(torch.sqrt(sr)) @ uhr, vr @ torch.diag(torch.sqrt(sr))


@torch.no_grad()
def init_from_base(layer: nn.Module, name: str, init, loftq_config: Optional[dict] = None) -> None:
    """Initialize adapter ``name`` of the LoRA wrapper ``layer`` from its base weight, and leave the residual
    in the base. Everything is computed before anything is written, and the replaced base weight is kept for
    :func:`restore_base`.

    Args:
        layer: a :class:`peftfast.layers.LoraLayer` whose ``lora_A[name]`` / ``lora_B[name]`` exist.
        name: the adapter.
        init: ``"pissa"``, ``"pissa_niter_<n>"``, ``"olora"`` or ``"loftq"``.
        loftq_config: for ``"loftq"``: ``{"loftq_bits": 4, "loftq_iter": T}`` (see :func:`check_loftq_config`).
    """
    from .layers.base_weight import dense_base_weight, stores_transposed
    from .kernels.nf4 import is_4bit_weight

    method, niter = parse_init(init)
    r, scaling = layer.r[name], layer.scaling[name]
    check_base_init(layer, init, r)
    base = layer.base_layer
    old = base.weight
    quantized = is_4bit_weight(old)
    # PEFT: float32 copy of the [N, K] weight (for Conv1D a transposed view of the stored [K, N])
    w = dense_base_weight(base).to(torch.float32)
    if method == "loftq":  # the base becomes deq(Q), not a residual (PEFT's loftq_init)
        loftq = check_loftq_config(init, loftq_config)
        residual, a, b = loftq_decompose(w, r, loftq["loftq_iter"])
    else:
        a, b = _decompose(w, method, niter, r, scaling)
        residual = w - scaling * b @ a
    if not quantized and old.dtype != torch.float32:
        # PEFT moves the new adapter to the base's dtype and autocasts it back to float32
        a, b = a.to(old.dtype).float(), b.to(old.dtype).float()
    record = _kept(base)  # first: the requantization below also rewrites the module's copy of the quant state
    try:
        new_weight = _requantized(base, residual) if quantized else None
    except BaseException:
        _put_back_quant_state(base, record[3])
        raise
    if new_weight is not None:
        base.weight = new_weight
    else:
        stored = residual.to(old.dtype)
        old.data = (stored.t() if stores_transposed(base) else stored).contiguous()
    layer.lora_A[name].weight.data = a.to(layer.lora_A[name].weight.dtype).contiguous()
    layer.lora_B[name].weight.data = b.to(layer.lora_B[name].weight.dtype).contiguous()
    layer.__dict__.setdefault("_pre_init_base", {})[name] = record


def _requantized(base: nn.Module, residual: torch.Tensor):
    """The float32 residual as a new ``Params4bit`` quantized like the old one (PEFT quantizes the float32
    tensor directly; peftfast keeps the old blocksize, and the dtype it decodes to)."""
    import bitsandbytes as bnb

    from .layers.base_weight import base_weight
    from .kernels.nf4 import quantization_settings

    old = base_weight(base)
    how = quantization_settings(old)
    new = bnb.nn.Params4bit(residual.contiguous(), requires_grad=False, quant_type=how["quant_type"],
                            blocksize=how["blocksize"], compress_statistics=how["compress_statistics"],
                            quant_storage=base.weight.dtype, module=base)
    new = new._quantize(residual.device)
    new.quant_state.dtype = how["compute_dtype"]
    return new


def _kept(base: nn.Module) -> tuple:
    """What :func:`restore_base` needs to put the base weight back exactly: the Parameter, its data (moved
    to the CPU off an accelerator: one host copy instead of a second device copy), and bitsandbytes' copy of
    the quant state on the module."""
    w = base.weight
    data = w.data if w.device.type in ("cpu", "meta") else w.data.to("cpu")
    return w, data, w.device, base.__dict__.get("quant_state", _MISSING)


_MISSING = object()


@torch.no_grad()
def restore_base(layer: nn.Module, name: Optional[str] = None) -> None:
    """Put back the base weight an init from the base replaced: the one before adapter ``name``'s init (a
    rolled-back patch), or with ``name=None`` the one before the first (``unpatch``). Bit for bit, and the
    same Parameter object. A no-op where no such init ran."""
    kept = layer.__dict__.get("_pre_init_base")
    if not kept:
        return
    if name is None:
        record = next(iter(kept.values()))
        kept.clear()
    elif name in kept:
        record = kept.pop(name)
    else:
        return
    param, data, device, quant_state = record
    base = layer.base_layer
    param.data = data if data.device == device else data.to(device)
    if base.weight is not param:
        base.weight = param
    _put_back_quant_state(base, quant_state)


def _put_back_quant_state(base: nn.Module, quant_state) -> None:
    if quant_state is _MISSING:
        base.__dict__.pop("quant_state", None)
    else:
        base.quant_state = quant_state


def forget_base(layer: nn.Module) -> None:
    """Drop the kept base weights (after ``unpatch(merge_adapters=True)``: the merged weight is the model)."""
    layer.__dict__.pop("_pre_init_base", None)


# ----------------------------------------------------------------------------------------------------
# Conversion on save (PEFT's path_initial_model_for_weight_conversion)
# ----------------------------------------------------------------------------------------------------


def convert_to_lora(tensors: dict, config: dict, initial: dict, initial_path: str) -> tuple:
    """Turn a trained adapter initialized from the base (PiSSA/OLoRA) into a plain LoRA adapter of rank 2r
    that applies to the original base, as PEFT's conversion does.

    Args:
        tensors: the trained adapter's tensors under PEFT's keys (``adapter_state_dict``).
        config: the adapter_config.json dict it would be saved with.
        initial: the tensors of the same adapter saved right after ``patch`` (before any training).
        initial_path: where ``initial`` came from (for messages).

    Returns:
        ``(tensors, config)``: ``lora_A`` = ``[A ; A0]`` (dim 0), ``lora_B`` = ``[B | -B0]`` (dim 1);
        ``r`` (and ``rank_pattern``) doubled, ``lora_alpha`` (and ``alpha_pattern``) scaled to keep the scaling,
        ``init_lora_weights`` True.

    Raises:
        ConfigError: an adapter this conversion cannot represent, or an initial adapter that does not match.

    Example:
        >>> peftfast.save_adapter(model, "out", path_initial_model_for_weight_conversion="init")  # doctest: +SKIP
    """
    init = config.get("init_lora_weights")
    if config.get("peft_type") != "LORA":
        raise ConfigError("path_initial_model_for_weight_conversion converts LoRA adapters only")
    if init is False:
        raise ConfigError("path_initial_model_for_weight_conversion: this adapter was made with init_lora_weights="
                          "False (B starts non-zero and the base is unchanged), so B A - B0 A0 is not its update; "
                          "the conversion is for 'pissa', 'pissa_niter_<n>' and 'olora' adapters (and True/'gaussian')")
    if init == "loftq":
        # PEFT converts it anyway: a wrong adapter, since the base LoftQ leaves is deq(Q), not W - s B0 A0
        raise ConfigError("path_initial_model_for_weight_conversion: a LoftQ adapter cannot be converted to a LoRA "
                          "adapter for the original base: its base is the quantized deq(Q), not W - scaling * B0 A0, "
                          "so W + scaling * (B A - B0 A0) is not the trained model; ship the adapter with its LoftQ "
                          "base (or its config, which re-runs LoftQ on the original base when loaded)")
    if config.get("use_rslora") and (config.get("rank_pattern") or config.get("alpha_pattern")):
        raise ConfigError("path_initial_model_for_weight_conversion is not supported with use_rslora=True together "
                          "with rank_pattern or alpha_pattern (PEFT refuses it too: alpha cannot keep the scaling)")
    rows = {k: saved_param(k) for k in tensors}
    other = sorted(k for k, row in rows.items() if row is None or row[0].attr not in ("lora_A", "lora_B")
                   or row[1] != "weight")
    if other:
        raise ConfigError(
            f"path_initial_model_for_weight_conversion: the adapter holds {len(other)} tensors besides lora_A/lora_B "
            f"(e.g. {other[:3]}: lora_bias, DoRA magnitudes, modules_to_save, embedding adapters or biases), which "
            "the rank-2r conversion cannot carry (PEFT's conversion drops them); save without the conversion"
        )
    if set(initial) != set(tensors):
        missing, extra = sorted(set(tensors) - set(initial)), sorted(set(initial) - set(tensors))
        raise ConfigError(f"{initial_path}: the initial adapter does not match this one (missing {missing[:3]}, "
                          f"extra {extra[:3]}); save it with peftfast.save_adapter right after patch, before training")
    out = {}
    for key, value in tensors.items():
        first = initial[key].to(value.dtype)
        if first.shape != value.shape:
            raise ConfigError(f"{initial_path}: {key} has shape {tuple(first.shape)}, the adapter's is "
                              f"{tuple(value.shape)}; the initial adapter belongs to another config")
        # B A - B0 A0 = [B | -B0] @ [A ; A0]
        is_a = rows[key][0].attr == "lora_A"
        out[key] = torch.cat([value, first], dim=0) if is_a else torch.cat([value, -first], dim=1)
    config = dict(config)
    config["init_lora_weights"] = True
    config["r"] = config["r"] * 2
    config["lora_alpha"] = config["lora_alpha"] * (2**0.5 if config.get("use_rslora") else 2)  # PEFT's factors
    if config.get("rank_pattern"):
        config["rank_pattern"] = {k: 2 * v for k, v in config["rank_pattern"].items()}
    if config.get("alpha_pattern"):
        config["alpha_pattern"] = {k: 2 * v for k, v in config["alpha_pattern"].items()}
    return out, config


# ----------------------------------------------------------------------------------------------------
# LoftQ for a model that is 4-bit already (PEFT's replace_lora_weights_loftq)
# ----------------------------------------------------------------------------------------------------


def _weight_reader(weights, model: nn.Module):
    """``name -> tensor`` over a dict of tensors, a ``.safetensors`` file, or a directory holding
    ``model.safetensors`` (or a sharded ``model.safetensors.index.json``). Read lazily, one tensor at a time."""
    import json
    import os

    if isinstance(weights, dict):
        return weights.get
    path = os.fspath(weights)
    files = {}
    if os.path.isdir(path):
        single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(single):
            path = single
        elif os.path.exists(index):
            with open(index) as f:
                files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        else:
            raise ConfigError(f"{weights}: no model.safetensors or model.safetensors.index.json there (LoftQ reads "
                              "the unquantized weights lazily from safetensors, as PEFT's replace_lora_weights_loftq)")
    elif not os.path.exists(path):
        raise ConfigError(f"{weights}: no such safetensors file")

    def get(key):
        from safetensors import safe_open

        file = files.get(key) if files else path
        if file is None:
            return None
        with safe_open(file, framework="pt", device="cpu") as f:
            return f.get_tensor(key) if key in f.keys() else None

    return get


@torch.no_grad()
def replace_lora_weights_loftq(model: nn.Module, weights, adapter_name: str = "default", callback=None) -> list:
    """Re-initialize adapter ``adapter_name``'s ``lora_A``/``lora_B`` on every 4-bit LoRA layer with LoftQ's
    one-shot step against that layer's *existing* 4-bit weight ``Q``: ``(A, B)`` = rank-r SVD factors of
    ``W - deq(Q)``, with ``W`` the unquantized weight (Hugging Face PEFT's ``replace_lora_weights_loftq``;
    ``deq(Q)`` is rounded to the weight's compute dtype first, as bitsandbytes' ``dequantize_4bit`` returns it
    there). The base is not changed. As in PEFT the scaling is not folded in.

    Args:
        model: a model patched by peftfast with a LoRA adapter on bitsandbytes 4-bit layers.
        weights: the original model's weights: a dict ``{module_name + ".weight": tensor}``, a ``.safetensors``
            file or a directory with ``model.safetensors`` (or a sharded index). Names are the model's module
            names; a name without the model's ``base_model_prefix`` (e.g. ``"model."``) is tried too, as PEFT does.
        adapter_name: the adapter to re-initialize.
        callback: optional ``callback(model, module_name) -> bool``, called after each layer's replacement;
            False puts that layer's previous A and B back (PEFT's greedy acceptance).

    Returns:
        The names of the layers whose adapter was replaced (and kept).

    Raises:
        ConfigError: no 4-bit LoRA layer with this adapter, or a layer's weight missing or of the wrong shape.
            Layers replaced before the error are put back (the model is as it was).

    Example:
        >>> peftfast.patch(model_4bit, peftfast.LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))  # doctest: +SKIP
        >>> peftfast.replace_lora_weights_loftq(model_4bit, "path/to/unquantized_model")  # doctest: +SKIP
    """
    from .layers.base_weight import dense_base_weight
    from .kernels.nf4 import is_4bit_weight
    from .layers import LoraLayer

    get = _weight_reader(weights, model)
    prefix = getattr(model, "base_model_prefix", None)
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, LoraLayer) and adapter_name in m.lora_A and is_4bit_weight(m.base_layer.weight)]
    if not layers:
        raise ConfigError(f"replace_lora_weights_loftq: no LoRA layer with adapter {adapter_name!r} on a bitsandbytes "
                          "4-bit base (quantize the model to 4-bit and patch it first)")
    done, kept = [], []
    try:
        for name, layer in layers:
            w = get(name + ".weight")
            if w is None and prefix and name.startswith(prefix + "."):
                w = get(name[len(prefix) + 1:] + ".weight")
            if w is None:
                raise ConfigError(f"replace_lora_weights_loftq: {name}.weight is not in the weights given; pass the "
                                  "unquantized model this 4-bit model was made from")
            if tuple(w.shape) != (layer.out_features, layer.in_features):
                raise ConfigError(f"replace_lora_weights_loftq: {name}.weight is {tuple(w.shape)}, the layer is "
                                  f"{layer.out_features}x{layer.in_features}; these are another model's weights")
            base = layer.base_layer
            deq = dense_base_weight(base).to(torch.float32)
            a, b = _svd_factors(w.to(deq.device, torch.float32) - deq, layer.r[adapter_name])
            pa, pb = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            done.append((pa, pa.data, pb, pb.data))
            pa.data = a.to(pa.dtype).contiguous()
            pb.data = b.to(pb.dtype).contiguous()
            if callback is not None and not callback(model, name):
                pa.data, pb.data = done[-1][1], done[-1][3]
                done.pop()
                continue
            kept.append(name)
    except BaseException:
        for pa, a0, pb, b0 in reversed(done):
            pa.data, pb.data = a0, b0
        raise
    return kept
