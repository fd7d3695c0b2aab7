"""lowbit benchmarks: one entry point, one mode per op family.

    python benchmarks/bench.py --mode quantize [--quick] [--json out.json]
    python benchmarks/bench.py --mode gemm  [-- bench_gemm.py options]
    python benchmarks/bench.py --mode gemm-t [-- bench_gemm_t.py options]
    python benchmarks/bench.py --mode optim [-- bench_optim.py options]
    python benchmarks/bench.py --mode optim-host [-- bench_optim_host.py options]
    python benchmarks/bench.py --mode qlora7b [-- bench_qlora7b.py options]
    python benchmarks/bench.py --mode linear [-- bench_linear.py options]

Prints a table and writes JSON (card, date, commit, numbers). Needs a CUDA GPU;
bitsandbytes is timed in the same run when it is installed. The gemm, optim,
qlora7b and linear modes run their own scripts (benchmarks/bench_gemm.py,
bench_optim.py, bench_qlora7b.py, bench_linear.py; gemm-t, the backward
op path by path, bench_gemm_t.py) with the options after
`--` (qlora7b's `-- --tiny` and linear's `-- --smoke` run on the CPU;
optim-host, the optimizer's host cost per tensor, on the CPU by default).
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
# Modes with a command line of their own: bench.py hands them the options after `--`.
SCRIPT_MODES = {"gemm": "bench_gemm", "optim": "bench_optim", "qlora7b": "bench_qlora7b", "linear": "bench_linear"}
SCRIPT_MODES["fsdp"] = "bench_fsdp"
SCRIPT_MODES["gemm-t"] = "bench_gemm_t"
SCRIPT_MODES["optim-host"] = "bench_optim_host"  # torchrun-launched: python benchmarks/bench.py --mode fsdp -- --out DIR


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=sorted(MODES) + sorted(SCRIPT_MODES), default="quantize")
    ap.add_argument("--quick", action="store_true", help="a subset of shapes")
    ap.add_argument("--json", help="write the results here")
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.mode in SCRIPT_MODES:
        # Each script checks for a GPU itself (bench_linear's --smoke runs on the CPU).
        mod = importlib.import_module(SCRIPT_MODES[args.mode])
        sys.argv = [mod.__file__] + rest + (["--json", args.json] if args.json else [])
        return mod.main()
    if not torch.cuda.is_available():
        sys.exit("benchmarks need a CUDA GPU (none visible)")
    meta = dict(card=device_name(), date=datetime.date.today().isoformat(), commit=_commit(),
                torch=torch.__version__)
    print(f"# {meta['card']}, {meta['date']}, commit {meta['commit']}, torch {meta['torch']}")
    out = dict(meta=meta)
    for mode in [args.mode]:
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
