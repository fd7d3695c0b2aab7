"""lowbit benchmarks: one entry point, one mode per op family.

    python benchmarks/bench.py --mode quantize [--quick] [--json out.json]

Prints a table and writes JSON (card, date, commit, numbers). Needs a CUDA GPU;
bitsandbytes is timed in the same run when it is installed.
"""
import argparse
import datetime
import importlib
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, print_table  # noqa: E402

MODES = {"quantize": "bench_quantize"}


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=sorted(MODES) + ["all"], default="quantize")
    ap.add_argument("--quick", action="store_true", help="a subset of shapes")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks need a CUDA GPU (none visible)")
    meta = dict(card=device_name(), date=datetime.date.today().isoformat(), commit=_commit(),
                torch=torch.__version__)
    print(f"# {meta['card']}, {meta['date']}, commit {meta['commit']}, torch {meta['torch']}")
    out = dict(meta=meta)
    for mode in sorted(MODES) if args.mode == "all" else [args.mode]:
        mod = importlib.import_module(MODES[mode])
        print(f"\n## {mode}")
        res, cols = mod.run(args)
        print_table(res["rows"], cols)
        out[mode] = res
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
