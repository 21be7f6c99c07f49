"""Grouped (per-expert) LoRA term: ``y[i] = scaling * (x[i] @ lhs[e_i]) @ rhs[e_i]``.

The low-rank update of a mixture-of-experts weight stack ``W [E, D1, D2]`` is ``scaling * lhs @ rhs`` with
``lhs [E, D1, r]`` and ``rhs [E, r, D2]`` (one factor pair per expert). A token routed to expert ``e``
needs only that expert's term, so instead of materializing ``E`` dense ``[D1, D2]`` deltas (what PEFT's
``ParamWrapper`` does on every forward) this op runs two grouped skinny GEMMs over the routed rows:
``xa = x @ lhs[e]`` ([S, r]) then ``y = scaling * xa @ rhs[e]``. Rows whose expert id is outside
``[0, E)`` (expert-parallel sentinels, rows past the last group) get zeros.

``expert_ids`` need not be sorted; sorted ids (as transformers' ``grouped_mm`` path produces) keep each
row tile of the Triton kernel on one or two experts. :func:`expert_ids_from_offsets` turns grouped_mm's
cumulative ``offs`` into ids.

Both paths compute in the wider of x's and the factors' dtypes (fp32 adapters on a bf16 base run in fp32,
as the LoRA branch of ``lora.lora_linear_reference``), accumulate in fp32 and return x's dtype. The Triton half (``grouped_lora_triton``) is
loaded lazily and only when Triton imports.
"""
from __future__ import annotations

import torch

from .dispatch import resolve_backend, triton_module
from .weights import float_operands_problem


def expert_ids_from_offsets(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row expert ids from grouped_mm's ``offs`` (cumulative group ends, [E]); rows at or past
    ``offs[-1]`` get ``E`` (no expert).

    Example:
        >>> expert_ids_from_offsets(torch.tensor([2, 2, 5]), 6).tolist()
        [0, 0, 2, 2, 2, 3]
    """
    positions = torch.arange(rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets.contiguous(), positions, right=True)


def check_grouped_lora_shapes(x, lhs, rhs, expert_ids) -> None:
    """Raise ValueError naming the operand whose shape does not fit ``x [S, D1], lhs [E, D1, r],
    rhs [E, r, D2], expert_ids [S]``."""
    if x.dim() != 2:
        raise ValueError(f"grouped_lora: x must be 2-D [S, D1], got shape {tuple(x.shape)}")
    if lhs.dim() != 3 or rhs.dim() != 3:
        raise ValueError(f"grouped_lora: lhs and rhs must be 3-D [E, D1, r] / [E, r, D2], got {tuple(lhs.shape)} "
                         f"and {tuple(rhs.shape)}")
    e, d1, r = lhs.shape
    if x.shape[1] != d1:
        raise ValueError(f"grouped_lora: x has {x.shape[1]} features but lhs expects {d1} (lhs {tuple(lhs.shape)})")
    if rhs.shape[0] != e or rhs.shape[1] != r:
        raise ValueError(f"grouped_lora: rhs {tuple(rhs.shape)} does not fit lhs {tuple(lhs.shape)} "
                         f"(expected [{e}, {r}, D2])")
    if expert_ids.dim() != 1 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"grouped_lora: expert_ids must be 1-D with one id per row of x ({x.shape[0]}), got "
                         f"shape {tuple(expert_ids.shape)}")
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"grouped_lora: expert_ids must be int32 or int64, got {expert_ids.dtype}")


def grouped_lora_reference(
    x: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, expert_ids: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Pure-PyTorch grouped LoRA term; differentiable in x, lhs and rhs.

    One loop over the experts that occur (one host sync for the list), each a pair of dense matmuls on
    that expert's rows. Under ``torch.compile`` that list and the rows' gather are data-dependent (a graph
    break each), so a traced call runs :func:`_grouped_lora_masked` instead: the same terms, no host sync.
    """
    if torch.compiler.is_compiling():
        return _grouped_lora_masked(x, lhs, rhs, expert_ids, scaling)
    num_experts = lhs.shape[0]
    compute = torch.promote_types(x.dtype, lhs.dtype)
    out = x.new_zeros(x.shape[0], rhs.shape[2], dtype=compute)
    valid = (expert_ids >= 0) & (expert_ids < num_experts)
    present = torch.unique(expert_ids[valid]).tolist()
    for e in present:
        rows = (expert_ids == e).nonzero(as_tuple=True)[0]
        xe = x.index_select(0, rows).to(compute)
        # [S_e, D1] @ [D1, r] -> [S_e, r];  [S_e, r] @ [r, D2] -> [S_e, D2]
        out = out.index_add(0, rows, (xe @ lhs[e].to(compute)) @ rhs[e].to(compute) * scaling)
    return out.to(x.dtype)


def _grouped_lora_masked(x, lhs, rhs, expert_ids, scaling) -> torch.Tensor:
    """The reference with static shapes, for traced calls: every expert's term on all rows, each kept only
    on its own rows (``torch.where``, so other rows add an exact zero). E times the low-rank FLOPs of the
    gathered loop, which is why eager calls do not use it."""
    compute = torch.promote_types(x.dtype, lhs.dtype)
    xc = x.to(compute)
    out = x.new_zeros(x.shape[0], rhs.shape[2], dtype=compute)
    for e in range(lhs.shape[0]):
        # [S, D1] @ [D1, r] -> [S, r];  [S, r] @ [r, D2] -> [S, D2]
        term = (xc @ lhs[e].to(compute)) @ rhs[e].to(compute) * scaling
        out = out + torch.where((expert_ids == e)[:, None], term, 0.0)
    return out.to(x.dtype)


def grouped_lora(
    x: torch.Tensor,
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    expert_ids: torch.Tensor,
    scaling: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The routed experts' LoRA terms, grouped by expert.

    Args:
        x: [S, D1] rows (tokens, one per token-expert pair), fp32/fp16/bf16.
        lhs: [E, D1, r] left factors, one per expert. rhs: [E, r, D2] right factors.
        expert_ids: [S] int32/int64, the expert of each row; ids outside [0, E) give zero rows.
        scaling: the LoRA scaling (``lora_alpha / r`` or rsLoRA's ``/ sqrt(r)``).
        backend: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        [S, D2] in x's dtype.

    Example:
        >>> y = grouped_lora(x, lhs, rhs, ids, 2.0)  # doctest: +SKIP
    """
    check_grouped_lora_shapes(x, lhs, rhs, expert_ids)
    supported, why = _triton_supports(x, lhs, rhs, expert_ids)
    if resolve_backend(backend, x.device, supported, why) == "triton":
        return _kernels.triton_grouped_lora(x, lhs, rhs, expert_ids, scaling)
    return grouped_lora_reference(x, lhs, rhs, expert_ids, scaling)


def _triton_supports(x, lhs, rhs, expert_ids):
    if _kernels is None:
        return False, "Triton is not importable on this platform"
    if lhs.shape[2] == 0 or x.shape[1] == 0:
        return False, "rank 0 or zero input features"
    why = float_operands_problem(x, (("lhs", lhs), ("rhs", rhs)))
    if not why and expert_ids.device != x.device:
        why = f"expert_ids is on {expert_ids.device} but x is on {x.device}"
    if not why and lhs.dtype != rhs.dtype:
        why = f"lhs is {lhs.dtype} but rhs is {rhs.dtype}; give both factors one dtype"
    return not why, why


# The Triton half (None without Triton); imported last, as it uses this module's names.
_kernels = triton_module("grouped_lora_triton")
