"""The ``peftfast`` command line (also ``python -m peftfast``)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="peftfast", description="Parameter-efficient fine-tuning with fused kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="QLoRA-train a tiny built-in Llama on the shipped corpus (CPU, < 1 min)")
    demo.add_argument("--steps", type=int, default=200)
    demo.add_argument("--output", default="out/demo-adapter")
    demo.add_argument("--seed", type=int, default=0)
    from .train import add_arguments as add_train_arguments

    train = sub.add_parser("train", help="fine-tune a causal LM with LoRA/QLoRA/DoRA/IA3/prefix/prompt tuning on a "
                           ".txt or .jsonl file (resumable: --resume)")
    add_train_arguments(train)
    from . import generate as generate_mod, inspect_adapter, merging as merge_mod

    generate_mod.add_arguments(sub.add_parser("generate", help="generate text with a base model plus an adapter"))
    merge_mod.add_arguments(sub.add_parser("merge", help="merge an adapter into its base and save_pretrained it "
                                           "(4-bit bases are dequantized, saved in bf16)"))
    inspect_adapter.add_arguments(sub.add_parser("inspect", help="describe an adapter directory (--json)"))
    from ..devtools.bench import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="run the benchmark suites in bench/ (smoke mode on CPU; --list, --table)")
    add_bench_arguments(bench)
    from ..devtools.tune import add_arguments as add_tune_arguments

    add_tune_arguments(sub.add_parser("tune", help="time the LoRA GEMM's configs for a model's shapes on this GPU "
                                      "and write kernels/configs/<gpu>.json (--dry-run lists the shapes)"))
    args = parser.parse_args(argv)
    if args.command == "bench":
        from ..devtools.bench import run_bench

        return run_bench(args)
    if args.command == "tune":
        from ..devtools.tune import run_tune

        return run_tune(args)
    if args.command == "train":
        from ..checkpoint import AdapterLoadError
        from ..config import ConfigError
        from .data import DataError
        from .train import TrainError, TrainInterrupted, run_train

        try:
            run_train(args)
        except (TrainError, DataError, ConfigError, AdapterLoadError, OSError) as e:
            print(f"peftfast train: error: {e}", file=sys.stderr)
            return 2
        except TrainInterrupted:
            return 130
        return 0
    if args.command in ("generate", "merge", "inspect"):
        from ..checkpoint import AdapterLoadError
        from ..config import ConfigError

        run = {"generate": generate_mod.run_generate, "merge": merge_mod.run_merge,
               "inspect": inspect_adapter.run_inspect}[args.command]
        try:
            run(args)
        except (generate_mod.GenerateError, merge_mod.MergeError, inspect_adapter.InspectError, AdapterLoadError,
                ConfigError, OSError) as e:
            print(f"peftfast {args.command}: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "demo":
        from .demo import run_demo

        result = run_demo(steps=args.steps, output=args.output, seed=args.seed)
        return 0 if result["max_abs_diff"] < 1e-4 else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
