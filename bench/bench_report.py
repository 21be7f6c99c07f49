"""Tables and plots made from the results JSON files: never type a figure by hand.

    python bench/bench_report.py [RESULTS_DIR]     # or: peftfast bench --table [--out RESULTS_DIR]

prints the markdown performance table for the README from ``bench/results/<gpu-slug>/<suite>.json``
(smoke-mode files are skipped: they are not figures). ``plot_suite`` draws the PNGs written beside the
JSON files (matplotlib is optional: without it no plot is drawn and the run says so).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

from bench_common import RESULTS_DIR, SUITES
from peftfast.fileio import replace_atomically

NO_RESULTS = ("No benchmark results committed yet: {where} holds no GPU results. "
              "Run `peftfast bench` on a CUDA GPU to produce them.")


# ---------------------------------------------------------------------------------------------- loading
def load_results(root: Path = RESULTS_DIR, include_smoke: bool = False) -> Dict[str, Dict[str, dict]]:
    """``{gpu_slug: {suite: result}}`` for every readable ``<root>/<slug>/<suite>.json``."""
    root = Path(root)
    out: Dict[str, Dict[str, dict]] = {}
    if not root.is_dir():
        return out
    for slug_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(slug_dir.glob("*.json")):
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(data, dict) or "suite" not in data:
                continue
            if data.get("smoke") and not include_smoke:
                continue
            out.setdefault(slug_dir.name, {})[data["suite"]] = data
    return out


# ---------------------------------------------------------------------------------------------- formats
def fmt_time(ms: Optional[float]) -> str:
    if ms is None or not math.isfinite(ms):
        return "n/a"
    if ms < 1.0:
        return f"{ms * 1e3:.1f} µs"
    if ms < 1000.0:
        return f"{ms:.2f} ms"
    return f"{ms / 1e3:.2f} s"


def fmt_ratio(x: Optional[float]) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def fmt_value(v: Optional[float], unit: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if unit == "x":
        return f"{v:.2f}x"
    if unit == "%":
        return f"{v:.1f}%"
    if isinstance(v, float):
        return f"{v:.3g} {unit}".strip()
    return f"{v} {unit}".strip()


def _gib(b: Optional[float]) -> str:
    return "n/a" if not b else f"{b / 2**30:.2f} GiB"


def _impl_cell(res: dict, extra: Optional[str] = None) -> str:
    if not res:
        return "n/a"
    if "unavailable" in res:
        return "unavailable"
    if "tokens_per_s" in res:
        return f"{res['tokens_per_s']:,.0f} tok/s, {_gib(res.get('peak_mem_bytes'))}"
    cell = fmt_time(res.get("median_ms"))
    if extra and res.get(extra) is not None:
        cell += f" ({res[extra]:.0f}%)"
    return cell


# ------------------------------------------------------------------------------------------------ tables
_EXTRA = {"lora_decode": "pct_of_hbm_roofline", "lora_train": "pct_of_matmul_ceiling",
          "prefix_attention": "pct_of_matmul_ceiling"}
_EXTRA_NAME = {"pct_of_hbm_roofline": "% of HBM roofline", "pct_of_matmul_ceiling": "% of bf16 matmul ceiling"}


def suite_table(result: dict) -> str:
    """Markdown table(s) of one suite's cases: each implementation's median and peftfast's speedups.

    Cases on different bases (bf16 / NF4) get a table each, since their baselines differ.
    """
    cases = result.get("cases") or []
    bases = []
    for c in cases:
        b = (c.get("shape") or {}).get("base")
        if b not in bases:
            bases.append(b)
    if len(bases) > 1:
        return "\n".join(f"{b} base:\n\n" + _one_table(result, [c for c in cases if c["shape"].get("base") == b])
                         for b in bases)
    return _one_table(result, cases)


def _one_table(result: dict, cases: List[dict]) -> str:
    if not cases:
        return f"_{result.get('suite')}: {result.get('status', 'no cases')}_\n"
    impl_names: List[str] = []
    for c in cases:
        for name in c.get("impls", {}):
            if name not in impl_names:
                impl_names.append(name)
    sp_names = [n for n in impl_names if n != "peftfast" and any((c.get("speedup") or {}).get(n) is not None
                                                                 for c in cases)]
    extra = _EXTRA.get(result.get("suite"))
    head = ["case"] + impl_names + [f"speedup vs {n}" for n in sp_names]
    if result.get("suite") == "ia3":
        head.append("overhead vs base")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        row = [c.get("name", "")]
        for n in impl_names:
            row.append(_impl_cell(c.get("impls", {}).get(n, {}), extra if n == "peftfast" else None))
        row += [fmt_ratio((c.get("speedup") or {}).get(n)) for n in sp_names]
        if result.get("suite") == "ia3":
            o = c.get("overhead_vs_base_pct")
            row.append("n/a" if o is None else f"{o:+.1f}%")
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    if extra:
        notes.append(f"peftfast's cell shows {_EXTRA_NAME[extra]} in parentheses")
    notes.append("speedup = baseline time / peftfast time (> 1: peftfast faster)")
    return "\n".join(lines) + "\n\n" + "; ".join(notes) + ".\n"


def headline_rows(results: List[dict]) -> List[List[str]]:
    rows = []
    for r in results:
        for h in r.get("headline") or []:
            rows.append([r.get("suite", "?"), h.get("label", ""), fmt_value(h.get("value"), h.get("unit", "")),
                         h.get("target") or ""])
        if not r.get("headline"):
            rows.append([r.get("suite", "?"), str(r.get("status", "")), "", ""])
    return rows


def headline_markdown(results: List[dict]) -> str:
    rows = headline_rows(results)
    lines = ["| suite | measure | value | target |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def headline_text(results: List[dict]) -> str:
    """The short plain-text table the CLI prints last."""
    rows = [["suite", "measure", "value", "target"]] + headline_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(r[i].ljust(widths[i]) for i in range(4)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_report(root: Path = RESULTS_DIR, include_smoke: bool = False, where: Optional[str] = None) -> str:
    """The README's performance section, generated from the JSON files under ``root``.

    Args:
        root: the results folder (``<root>/<gpu-slug>/<suite>.json``).
        include_smoke: render smoke-mode files too (flagged as not figures).
        where: how the text names ``root`` (default: its path relative to the working directory); a
            staging copy that will be unpacked at the repository root is named ``bench/results/``.

    Returns:
        Markdown: per GPU, the versions line, the headline table and one table per suite.
    """
    data = load_results(root, include_smoke=include_smoke)
    where = where or _display(root)
    if not data:
        return NO_RESULTS.format(where=where) + "\n"
    parts = []
    for slug, suites in data.items():
        any_env = next((s.get("env") for s in suites.values() if s.get("env")), {}) or {}
        gpu = (any_env.get("gpu") or {}).get("name") or slug
        v = any_env.get("versions") or {}
        parts.append(f"### {gpu}\n")
        commit = (any_env.get("git_commit") or "unknown")[:12]
        dirty = " (uncommitted changes)" if any_env.get("git_dirty") else ""
        driver = (any_env.get("gpu") or {}).get("driver")
        parts.append(
            f"Measured {any_env.get('date', '?')} at commit `{commit}`{dirty}; driver {driver}, "
            f"torch {v.get('torch')}, triton {v.get('triton')}, bitsandbytes {v.get('bitsandbytes')}, "
            f"peft {v.get('peft')}, peftfast {v.get('peftfast')}. Command: `{any_env.get('command', '?')}`. "
            f"Files: `{where}{slug}/`.\n")
        if any(s.get("smoke") for s in suites.values()):
            parts.append("**Smoke-mode results (CPU, tiny shapes): not figures.**\n")
        ordered = [suites[s] for s in SUITES if s in suites] + [v for k, v in suites.items() if k not in SUITES]
        parts.append(headline_markdown(ordered))
        c = next((s.get("ceilings") for s in ordered if s.get("ceilings")), None)
        if c:
            parts.append(f"Ceilings measured in the same run: copy {c['copy_gbps']:.4g} GB/s, "
                         f"bf16 matmul {c['matmul_bf16_tflops']:.4g} TFLOP/s.\n")
        for s in ordered:
            if s.get("suite") == "ceilings":
                continue
            parts.append(f"#### {s.get('suite')}\n")
            if s.get("status") not in (None, "ok"):
                parts.append(f"Status: {s['status']}\n")
            parts.append(suite_table(s))
            if s.get("loss_agreement"):
                a = s["loss_agreement"]
                parts.append(f"Loss curves over {a['steps']} steps: max |peftfast - PEFT| = {a['max_abs_diff']:.3g}.\n")
    return "\n".join(parts)


def _display(root: Path) -> str:
    try:
        return str(Path(root).resolve().relative_to(Path.cwd().resolve())) + "/"
    except ValueError:
        return str(root).rstrip("/") + "/"


# ------------------------------------------------------------------------------------------------- plots
def plot_suite(result: dict, out_dir: Path) -> List[str]:
    """Draw ``<suite>.png`` (and ``e2e_qlora_loss.png``) beside the JSON; returns the files written.

    Raises ImportError when matplotlib is missing (the caller records that no plot was drawn).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    suite = result.get("suite")
    cases = result.get("cases") or []
    if suite == "e2e_qlora":
        curves = result.get("loss_curves") or {}
        if curves:
            fig, ax = plt.subplots(figsize=(7, 4))
            for side, losses in curves.items():
                ax.plot(range(1, len(losses) + 1), losses, label=side)
            agreement = result.get("loss_agreement") or {}
            ax.set_title(f"e2e_qlora loss curves (max |diff| {agreement.get('max_abs_diff', float('nan')):.3g})")
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.legend()
            written.append(_save(fig, out_dir / "e2e_qlora_loss.png"))
            plt.close(fig)
        labels, values = [], []
        for c in cases:
            for side, res in c.get("impls", {}).items():
                if "tokens_per_s" in res:
                    labels.append(f"{side}\n{'ckpt on' if c['shape'].get('gradient_checkpointing') else 'ckpt off'}")
                    values.append(res["tokens_per_s"])
        if values:
            fig, ax = plt.subplots(figsize=(7, 4))
            ax.bar(range(len(values)), values)
            ax.set_xticks(range(len(values)), labels, fontsize=8)
            ax.set_ylabel("tokens/s")
            ax.set_title("e2e_qlora throughput")
            written.append(_save(fig, out_dir / "e2e_qlora.png"))
            plt.close(fig)
        return written
    names = []
    for c in cases:
        for n, v in (c.get("speedup") or {}).items():
            if v is not None and n not in names:
                names.append(n)
    if not names:
        return written
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.28 * len(cases) * max(1, len(names)) / 2 + 1.5)))
    height = 0.8 / len(names)
    for j, n in enumerate(names):
        ys = [i + j * height for i in range(len(cases))]
        xs = [(c.get("speedup") or {}).get(n) or 0.0 for c in cases]
        ax.barh(ys, xs, height=height, label=f"vs {n}")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))], [c.get("name", "") for c in cases], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of peftfast (baseline time / peftfast time)")
    ax.set_title(f"{suite}{' (SMOKE: not figures)' if result.get('smoke') else ''}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out_dir / f"{suite}.png"))
    plt.close(fig)
    return written


def _save(fig, path: Path) -> str:
    with replace_atomically(path) as f:
        fig.savefig(f, format="png", dpi=110)
    return str(path)


if __name__ == "__main__":
    print(markdown_report(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR), end="")
