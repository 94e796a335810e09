"""Comparison tables: `python -m benchmarks.run {embedding,topk,mts,all} [--threads 1 2] [--quick]`.

Each table module `benchmarks/table_<name>.py` defines ``run(threads, quick) -> str`` that times the
op and its baselines in the same process (medians) and returns a Markdown table. The table is
printed and written to ``benchmarks/results/<name>-cpu.md`` (temporary file, then rename).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform

import torch

from mtkernels.training.checkpoint import atomic_write

TABLES = {"embedding": "table_embedding", "topk": "table_topk", "mts": "table_mts"}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=[*TABLES, "all"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    names = list(TABLES) if args.table == "all" else [args.table]
    header = f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores\n\n"
    for name in names:
        module = importlib.import_module(f"benchmarks.{TABLES[name]}")
        table = module.run(threads=args.threads, quick=args.quick)
        print(table, flush=True)
        if not args.no_write:
            os.makedirs(RESULTS, exist_ok=True)
            text = header + table + "\n"
            atomic_write(os.path.join(RESULTS, f"{name}-cpu.md"), lambda f: f.write(text.encode()))


if __name__ == "__main__":
    main()
