"""neighborhood_aggregate (ContMix's dynamic-kernel op): the torch backend against the reference that
gathers every k x k window (the unfold approach), forward+backward time and peak memory.

    python benchmarks/neighborhood.py        # CPU, fp32; the bar case B=2, C=256, 50x68, K=13, 8 groups

Times are medians in one process; peak memory is measured per backend in a fresh child process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch

from vzoo.bench import NEIGHBORHOOD_BAR_CASE, median_ms, neighborhood_step, step_peak_mb

# (B, channels, H, W, kernel, groups): the bar case first, then detection-like maps
CASES = [NEIGHBORHOOD_BAR_CASE, (2, 128, 100, 136, 13, 4), (2, 512, 25, 34, 7, 16)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory", nargs=2, metavar=("CASE", "BACKEND"), help=argparse.SUPPRESS)  # child process
    a = p.parse_args()
    if a.memory:
        print(step_peak_mb(neighborhood_step(CASES[int(a.memory[0])], a.memory[1])))
        return
    print(f"{'B,C,H,W,K,G':<24} {'backend':>9} {'fwd+bwd ms':>11} {'x':>6} {'peak MB':>8}")
    for n, case in enumerate(CASES):
        res = {}
        for backend in ("reference", "torch"):
            ms = median_ms(neighborhood_step(case, backend), torch.device("cpu"), a.repeats)
            cmd = [sys.executable, __file__, "--memory", str(n), backend]
            mb = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])
            res[backend] = (ms, mb)
        for backend, (ms, mb) in res.items():
            print(f"{str(case):<24} {backend:>9} {ms:>11.1f} {res['reference'][0] / ms:>6.2f} {mb:>8.0f}")
        if n == 0:
            speed = res["reference"][0] / res["torch"][0]
            memory = res["torch"][1] / res["reference"][1]
            print(f"{'PASS' if speed >= 3 else 'FAIL'} fwd+bwd vs reference: {speed:.2f}x (bar 3x)")
            print(f"{'PASS' if memory <= 1 / 3 else 'FAIL'} peak memory vs reference: {memory:.2f} (bar 0.33)")


if __name__ == "__main__":
    main()
