"""``peftfast bench``: run the benchmark suites of ``bench/`` (a checkout's, not part of the wheel).

    peftfast bench                      # every suite; full sizes on CUDA, smoke mode without CUDA
    peftfast bench lora_decode ia3      # some suites
    peftfast bench --smoke              # tiny sizes on CPU: exercises the code, records no figure
    peftfast bench --profile headline   # only the cases behind the headline ratios (minutes, not ten)
    peftfast bench --list               # the suites and what they measure
    peftfast bench --table              # the markdown performance table from bench/results/*/*.json

On CUDA, results go to ``bench/results/<gpu-slug>/<suite>.json`` (``--out DIR`` replaces
``bench/results``), each written atomically, with PNG plots beside them when matplotlib is installed.
In smoke mode nothing is written unless ``--out`` names a directory outside ``bench/results``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

SUITE_NAMES = ("ceilings", "lora_decode", "lora_train", "ia3", "prefix_attention", "e2e_qlora")


class BenchError(Exception):
    pass


def bench_dir() -> Path:
    """The repository's ``bench/`` directory (from this file's location, ``PEFTFAST_BENCH_DIR`` or the cwd)."""
    candidates = []
    if os.environ.get("PEFTFAST_BENCH_DIR"):
        candidates.append(Path(os.environ["PEFTFAST_BENCH_DIR"]))
    candidates += [Path(__file__).resolve().parents[2] / "bench", Path.cwd() / "bench"]
    for c in candidates:
        if (c / "bench_common.py").is_file():
            return c.resolve()
    raise BenchError("bench/ not found: run `peftfast bench` from a checkout of the peftfast repository "
                     "(the benchmarks are not installed with the package), or set PEFTFAST_BENCH_DIR")


def _import_bench():
    d = str(bench_dir())
    if d not in sys.path:
        sys.path.insert(0, d)
    import importlib

    return importlib.import_module("bench_common"), importlib.import_module("bench_report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"suites to run (default: all): {', '.join(SUITE_NAMES)}")
    parser.add_argument("--smoke", action="store_true", default=None,
                        help="tiny sizes on CPU, reference kernels, no figure recorded (default without CUDA)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="results root (default bench/results); files go to DIR/<gpu-slug>/<suite>.json")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument("--table", action="store_true",
                        help="print the markdown performance table from the results JSON files and exit")
    parser.add_argument("--include-smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-plots", action="store_true", help="do not draw PNG plots")
    parser.add_argument("--profile", choices=("full", "headline"), default=None,
                        help="full: every case (default); headline: only the cases behind the headline ratios "
                             "(what bench/gpu_session.sh runs on a lent GPU)")
    parser.add_argument("--e2e-layers", type=int, default=None, metavar="N",
                        help="decoder layers of the e2e_qlora model (default 4; smoke: 2)")
    parser.add_argument("--e2e-loss-steps", type=int, default=None, metavar="N",
                        help="steps of the e2e_qlora loss-curve comparison (default 50; smoke: 4)")


class Progress:
    """Progress on stderr: tqdm's bar per suite (the case just finished beside it) on a terminal; one line per
    finished case elsewhere (CI logs, a file), where a redrawn bar would be noise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._bar, self._suite = None, None

    def __call__(self, suite: str, done: int, total: int, label: str) -> None:
        if not self.tty:
            self.stream.write(f"{suite} {done}/{total} {label}  ({time.perf_counter() - self.t0:.1f} s)\n")
            self.stream.flush()
            return
        from tqdm import tqdm

        if self._bar is None or self._suite != suite:
            self.close()
            self._bar, self._suite = tqdm(total=total, desc=suite, unit="case", file=self.stream), suite
        self._bar.total = total  # a suite may learn of more cases as it goes
        self._bar.set_postfix_str(label, refresh=False)
        self._bar.update(done - self._bar.n)
        if done >= total > 0:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar, self._suite = None, None


def _canonical_argv(args) -> List[str]:
    argv = list(args.suites)
    if args.smoke:
        argv.append("--smoke")
    if args.out:
        argv += ["--out", args.out]
    if args.no_plots:
        argv.append("--no-plots")
    if args.profile is not None:
        argv += ["--profile", args.profile]
    if args.e2e_layers is not None:
        argv += ["--e2e-layers", str(args.e2e_layers)]
    if args.e2e_loss_steps is not None:
        argv += ["--e2e-loss-steps", str(args.e2e_loss_steps)]
    return argv


def run_bench(args, stdout=None) -> int:
    """The body of ``peftfast bench``; returns the exit status."""
    out = stdout or sys.stdout
    try:
        common, report = _import_bench()
    except BenchError as e:
        print(f"peftfast bench: error: {e}", file=sys.stderr)
        return 2
    unknown = [s for s in args.suites if s not in common.SUITES]
    if unknown:
        print(f"peftfast bench: error: unknown suite(s) {unknown}; choose from {', '.join(common.SUITES)}",
              file=sys.stderr)
        return 2
    if args.list:
        import importlib

        for name in common.SUITES:
            doc = (importlib.import_module(f"bench_{name}").__doc__ or "").strip().splitlines()[0]
            print(f"{name:18s} {doc.split(': ', 1)[-1] if doc.startswith('Suite') else doc}", file=out)
        return 0
    root = Path(args.out) if args.out else common.RESULTS_DIR
    if args.table:
        print(report.markdown_report(root, include_smoke=args.include_smoke), end="", file=out)
        return 0

    import torch

    smoke = args.smoke
    if smoke is None and not torch.cuda.is_available():
        print("peftfast bench: no CUDA GPU: running in smoke mode (tiny sizes, no figure recorded)", file=sys.stderr)
        smoke = True
    options = {"e2e_layers": args.e2e_layers, "e2e_loss_steps": args.e2e_loss_steps, "profile": args.profile}
    try:
        progress = Progress()
        ctx = common.make_context(smoke=bool(smoke), progress=progress, **options)
    except RuntimeError as e:
        print(f"peftfast bench: error: {e}", file=sys.stderr)
        return 2
    write = (not ctx.smoke) or args.out is not None
    if ctx.smoke and args.out is not None and common.inside(root, common.RESULTS_DIR):
        print(f"peftfast bench: error: smoke-mode numbers are not figures; refusing to write them under "
              f"{common.RESULTS_DIR} (give --out another directory)", file=sys.stderr)
        return 2
    if not ctx.smoke and os.environ.get("PEFTFAST_BACKEND"):
        print(f"peftfast bench: warning: PEFTFAST_BACKEND={os.environ['PEFTFAST_BACKEND']} is set; it changes what "
              "backend='auto' picks in e2e_qlora (recorded in the results)", file=sys.stderr)
    if ctx.smoke:
        print("peftfast bench: SMOKE MODE: tiny sizes, reference kernels; these numbers are not figures"
              + ("" if write else " and nothing is written"), file=sys.stderr)
    command = common.command_line(_canonical_argv(args))
    env = common.environment(ctx, command)
    slug_dir = root / env["slug"]
    wanted = [s for s in common.SUITES if not args.suites or s in args.suites]
    import importlib

    results, failed = [], False
    t_all = time.perf_counter()
    with _one_thread_if(ctx):
        common.measure_ceilings(ctx)
        for name in wanted:
            t0 = time.perf_counter()
            try:
                res = importlib.import_module(f"bench_{name}").run(ctx=ctx)
            except Exception as e:  # noqa: BLE001 - one broken suite must not lose the others' results
                progress.close()  # the suite's bar stops where it broke; the message goes below it
                failed = True
                res = common.suite_result(name, ctx, [], config={}, headline=[],
                                          status=f"error: {type(e).__name__}: {str(e)[:500]}")
                print(f"\npeftfast bench: suite {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            res["elapsed_s"] = time.perf_counter() - t0
            res["env"] = env
            results.append(res)
            if write:
                path = common.write_json_atomic(slug_dir / f"{name}.json", res)
                print(f"wrote {path}", file=sys.stderr)
                if not args.no_plots and res.get("cases"):
                    try:
                        for p in report.plot_suite(res, slug_dir):
                            print(f"wrote {p}", file=sys.stderr)
                    except ImportError:
                        print("(matplotlib not installed: no plot drawn)", file=sys.stderr)
                    except Exception as e:  # noqa: BLE001
                        print(f"(plot for {name} failed: {type(e).__name__}: {e})", file=sys.stderr)
    total = time.perf_counter() - t_all
    print(f"\n{'SMOKE MODE (not figures): ' if ctx.smoke else ''}{len(results)} suite(s) in {total:.1f} s"
          f"{' on ' + str(env['gpu'].get('name')) if env['gpu'].get('name') else ''}", file=out)
    print(report.headline_text(results), file=out)
    return 1 if failed else 0


class _one_thread_if:
    """Smoke mode on CPU: one torch thread (tiny ops on a loaded machine crawl with several)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.threads = None

    def __enter__(self):
        if self.ctx.smoke:
            import torch

            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        return False


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="peftfast bench", description="Run peftfast's benchmark suites")
    add_arguments(parser)
    return run_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
