"""Benchmark: drift detection on simulated traffic -- false alarms on a daily cycle, detection delay and power on
shifts of growing size; the seasonal (same hour of day) reference against the naive previous-window reference and
against Evidently-style defaults on the whole reference (``all``: no calibration), on the same streams.

Streams come from :mod:`lmstack.monitor.simulate` (fixed seeds). All runs use the default DriftConfig (1-hour
windows, alpha = 0.01 per window and signal, 3 consecutive windows to alert, 3 clean ones to resolve).

- stable: 14 simulated days with the daily cycle and nothing else; reference = days 0-6, current = days 7-13.
  False-alarm rate = days with at least one alert / days monitored (goal <= 1%), and alerts per day.
- shifts (seasonal and previous only): 7 days, reference = days 0-3, current = days 4-6, the shift from day 5
  00:00 (day 4 is a stable control). Power = share of seeds with an alert on a signal of the shift's kind after
  it; delay = windows from the shift to that alert (median over detected seeds). Alerts before the shift count
  as false alarms.

    .venv/bin/python bench/drift.py                      # ~5 minutes on 2 shared cores
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmstack.monitor.drift import drift_report
from lmstack.monitor.simulate import START, simulate_traffic, split_at_day

MODES = ("seasonal", "previous", "all")
RELEVANT = {"topic": {"topic", "topic_novelty", "embedding", "oov_rate"},
            "length": {"input_len"},
            "refusal": {"refusal"}}


def stable(seeds: list[int], rate: float) -> list[str]:
    lines = ["| reference | days monitored | days with an alert | false-alarm rate / day | alerts / day | signals |",
             "| --- | --- | --- | --- | --- | --- |"]
    streams = [split_at_day(simulate_traffic(days=14, rows_per_hour=rate, shift_day=None, seed=s), 7) for s in seeds]
    for mode in MODES:
        days_hit, n_alerts, sigs = 0, 0, set()
        for seed, (ref, cur) in zip(seeds, streams):
            rep = drift_report(ref, cur, {"reference": mode, "seed": seed})
            days = {int((a["opened_at"] - START) // 86400) for a in rep["alerts"]}
            days_hit += len(days)
            n_alerts += len(rep["alerts"])
            sigs |= {a["signal"] for a in rep["alerts"]}
        total = 7 * len(seeds)
        lines.append(f"| {mode} | {total} | {days_hit} | {days_hit / total:.1%} | {n_alerts / total:.2f} | "
                     f"{', '.join(sorted(sigs)) or '-'} |")
    return lines


def shifts(seeds: list[int], rate: float) -> list[str]:
    scenarios = [("topic", {"topic_shift": x}, f"topic {x:.0%}") for x in (0.05, 0.1, 0.3)]
    scenarios += [("length", {"length_scale": x}, f"input length x{x}") for x in (1.1, 1.25, 1.5)]
    scenarios += [("refusal", {"refusal_rate": x}, f"refusal {x:.0%}") for x in (0.02, 0.05, 0.2)]
    shift = START + 5 * 86400
    modes = ("seasonal", "previous")  # "all" alarms on the cycle already (the stable table), so its power is moot
    lines = ["| shift | " + " | ".join(f"{m}: power / median delay (windows)" for m in modes)
             + " | alerts before the shift (seasonal / previous) |",
             "| --- |" + " --- |" * (len(modes) + 1)]
    for kind, knobs, label in scenarios:
        cells, fa = [], []
        streams = [split_at_day(simulate_traffic(days=7, rows_per_hour=rate, shift_day=5, seed=100 + s, **knobs), 4)
                   for s in seeds]
        for mode in modes:
            delays, false = [], 0
            for seed, (ref, cur) in zip(seeds, streams):
                rep = drift_report(ref, cur, {"reference": mode, "seed": seed})
                false += sum(a["opened_at"] < shift for a in rep["alerts"])
                hits = [a["opened_at"] for a in rep["alerts"]
                        if a["opened_at"] >= shift and a["signal"] in RELEVANT[kind]]
                if hits:
                    delays.append(int((min(hits) - shift) // 3600))
            power = len(delays) / len(seeds)
            cells.append(f"{power:.0%} / {statistics.median(delays) if delays else '-'}")
            fa.append(str(false))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {' / '.join(fa)} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rows-per-hour", type=float, default=60.0)
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    print(f"## stable daily cycle ({args.rows_per_hour:g} rows/hour on average, seeds {seeds})\n")
    print("\n".join(stable(seeds, args.rows_per_hour)))
    print(f"\n## shifts from day 5 (reference days 0-3, current days 4-6, seeds {seeds})\n")
    print("\n".join(shifts(seeds, args.rows_per_hour)))
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
