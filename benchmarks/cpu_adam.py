"""What an offloaded optimizer step costs on this host: DeepSpeedCPUAdam and torch's foreach AdamW over fp32
parameters, against the host memory bandwidth torch's add_ reaches (the cost model prices the CPU step as
uniap.cost.model.CPU_ADAM_HOST_BYTES per parameter at the host's memory bandwidth: uniap.cost.model.CostModel.cpu_adam).

    python benchmarks/cpu_adam.py [--params 100000000] [--threads 1 2] [--json out.json]

DeepSpeedCPUAdam is compiled on first use (minutes, once; then cached under ~/.cache/torch_extensions). Each
figure is the median of 5 steps after one warm-up, each thread count in its own process (OpenMP fixes its
threads at start).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPEATS = 5
ADD_BYTES = 12  # add_: read two fp32 values, write one


def median_seconds(step) -> float:
    step()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[REPEATS // 2]


def measure(params: int, threads: int) -> dict:
    """One process's figures (run with OMP_NUM_THREADS = threads)."""
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    torch.set_num_threads(threads)
    a, b = torch.randn(params), torch.randn(params)
    out = {
        "threads": threads,
        "params": params,
        "add_gbps": params * ADD_BYTES / median_seconds(lambda: b.add_(a)) / 1e9,
    }
    for name, make in (
        ("deepspeed_cpu_adam_s", lambda p: DeepSpeedCPUAdam([p], lr=1e-4, adamw_mode=True)),
        ("torch_adamw_foreach_s", lambda p: torch.optim.AdamW([p], lr=1e-4, foreach=True)),
    ):
        p = torch.nn.Parameter(torch.randn(params))
        p.grad = torch.randn(params)
        out[name] = median_seconds(make(p).step)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=100_000_000, help="fp32 parameters (default: %(default)s)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    ap.add_argument("--json", help="write the rows here (default: print only)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process measuring one thread count
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.params, args.one)))
        return 0
    from uniap.cost.model import CPU_ADAM_HOST_BYTES

    rows = []
    for threads in args.threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": "cpu"}
        cmd = [sys.executable, __file__, "--params", str(args.params), "--one", str(threads)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{'threads':>7} {'add_ GB/s':>9} {'DS CPU-Adam s':>13} {'its GB/s':>8} {'torch AdamW s':>13}  (measured)")
    for r in rows:
        adam_gbps = r["params"] * CPU_ADAM_HOST_BYTES / r["deepspeed_cpu_adam_s"] / 1e9
        r["deepspeed_cpu_adam_gbps"] = adam_gbps
        print(
            f"{r['threads']:>7} {r['add_gbps']:>9.1f} {r['deepspeed_cpu_adam_s']:>13.3f} {adam_gbps:>8.1f} "
            f"{r['torch_adamw_foreach_s']:>13.3f}"
        )
    if args.json:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
        with open(args.json, "w") as f:
            json.dump(
                {"cpu": cpu, "cores": os.cpu_count(), "bytes_per_param": CPU_ADAM_HOST_BYTES, "rows": rows}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
