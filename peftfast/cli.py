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

    train = sub.add_parser("train", help="fine-tune a causal LM with LoRA/QLoRA/DoRA/IA3 on a .txt or .jsonl file")
    add_train_arguments(train)
    args = parser.parse_args(argv)
    if args.command == "train":
        from .data import DataError
        from .train import TrainError, run_train

        try:
            run_train(args)
        except (TrainError, DataError) as e:
            print(f"peftfast train: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "demo":
        from .demo import run_demo

        result = run_demo(steps=args.steps, output=args.output, seed=args.seed)
        return 0 if result["max_abs_diff"] < 1e-4 else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
