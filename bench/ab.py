"""Benchmark: peeking at A/B tests -- the mSPRT's always-valid p-value against naive repeated fixed-horizon tests.

Many simulated experiments on 0/1 outcomes (a conversion or thumbs-up rate of 10% in A), a look after every
batch of 200 users per arm. Under the null (B = A) the rejection rate is the false-positive rate: naive peeking
(stop at the first look with a z-test p < 0.05) inflates it with every extra look; the mSPRT
(:class:`lmstack.monitor.ab.MSPRT`, normal mixture, Johari et al. 2017) stays at or below alpha however often one
looks. With an effect, the rejection rate is power (and the mSPRT pays for its validity with some of it).

    .venv/bin/python bench/ab.py                 # a few seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmstack.monitor.ab import simulate_peeking


def main() -> None:
    n = 10000
    print(f"## false positives under the null (p_A = p_B = 0.10, {n} experiments, 200 users per arm per look)\n")
    print("| looks | naive peeking | mSPRT (always valid) | one fixed-horizon test at the end |")
    print("| --- | --- | --- | --- |")
    for looks in (1, 5, 10, 20, 50):
        r = simulate_peeking(n, looks, 200, 0.10, 0.10, seed=looks)
        print(f"| {looks} | {r['naive_peeking']:.1%} | {r['msprt']:.1%} | {r['fixed_once']:.1%} |")
    print(f"\n## power with an effect (p_A = 0.10, 20 looks of 200 per arm, {n // 2} experiments)\n")
    print("| p_B | naive peeking (invalid) | mSPRT | fixed horizon at the end | mSPRT mean stopping look |")
    print("| --- | --- | --- | --- | --- |")
    for pb in (0.105, 0.11, 0.12, 0.13, 0.15):
        r = simulate_peeking(n // 2, 20, 200, 0.10, pb, seed=int(pb * 1000))
        stop = f"{r['msprt_mean_stop_look']:.1f}" if r["msprt_mean_stop_look"] else "-"
        print(f"| {pb} | {r['naive_peeking']:.1%} | {r['msprt']:.1%} | {r['fixed_once']:.1%} | {stop} |")


if __name__ == "__main__":
    main()
