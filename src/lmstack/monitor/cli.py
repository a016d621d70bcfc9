"""``lmstack monitor drift|ab|alerts|report``: drift with a seasonal reference, A/B readouts, alert rules, the
dashboard. Thin: parse arguments, call :mod:`lmstack.monitor`; numpy and matplotlib load inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lmstack.errors import ConfigError, LmstackError


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmstack.clihelp import HelpFormatter, int_at_least, positive_float

    p = subparsers.add_parser("monitor", help="production monitoring: drift, alerts, A/B tests, dashboard",
                              description="Keep evaluating a live model from its interaction rows (JSONL of "
                                          "{time, input, output, ...}): drift against a seasonal reference with "
                                          "calibrated thresholds, alert rules, A/B readouts with SRM and sequential "
                                          "tests, a static HTML dashboard. See docs/monitor.md.",
                              formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="monitor_command", metavar="COMMAND")

    win = argparse.ArgumentParser(add_help=False)
    win.add_argument("--window", type=positive_float, default=3600.0, metavar="SECONDS",
                     help="window length in seconds")

    d = sub.add_parser("drift", parents=[win], help="per-signal drift of current rows against reference rows",
                       formatter_class=HelpFormatter,
                       epilog="examples:\n  lmstack monitor drift --reference ref.jsonl --current cur.jsonl --json\n"
                              "  lmstack monitor drift --reference ref.jsonl --current cur.jsonl --period day "
                              "--consecutive 2")
    d.add_argument("--reference", required=True, metavar="REF.jsonl", help="the reference period's rows")
    d.add_argument("--current", required=True, metavar="CUR.jsonl", help="the rows to check")
    d.add_argument("--config", default=None, metavar="FILE",
                   help="a YAML/JSON drift config (fields of DriftConfig); flags override it")
    d.add_argument("--period", default=None, help="seasonal period: auto, day, week or seconds")
    d.add_argument("--baseline", choices=("seasonal", "previous", "all"), default=None,
                   help="reference: same phase of the period (seasonal), the previous window, or all of it")
    d.add_argument("--alpha", type=positive_float, default=None, help="target false-alarm rate per window")
    d.add_argument("--consecutive", type=int_at_least(1), default=None, help="drifted windows in a row to alert")
    d.add_argument("--clear-after", type=int_at_least(1), default=None, help="clean windows in a row to resolve")
    d.add_argument("--signals", default=None, help="comma-separated subset of signals")
    d.add_argument("--min-rows", type=int_at_least(2), default=None, help="rows a window needs to be tested")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--embedder", default="hashed",
                   help="input embeddings: hashed (fast, offline n-gram hashing), rag (the RAG layer's MiniLM "
                        "encoder) or an encoder folder; rows with an 'embedding' field use theirs")
    d.add_argument("--json", action="store_true", help="print the whole report as JSON")
    d.add_argument("--out", default=None, metavar="FILE", help="also write the JSON report here")
    d.set_defaults(func=cmd_drift)

    a = sub.add_parser("ab", help="A/B readout: SRM check, per-arm intervals, fixed and sequential tests",
                       formatter_class=HelpFormatter,
                       epilog="examples:\n  lmstack monitor ab outcomes.jsonl --metric converted --kind rate\n"
                              "  lmstack monitor ab rows.jsonl --metric thumbs_up --shares A=0.9,B=0.1 --json")
    a.add_argument("rows", metavar="ROWS.jsonl", nargs="?", default=None,
                   help="one row per user or interaction: {arm, <metric>, time?}")
    a.add_argument("--store", default=None, metavar="URL",
                   help="read the interactions (with their thumbs) from the log store instead of ROWS.jsonl")
    a.add_argument("--metric", required=True, help="the outcome field (top level or in meta; thumbs_up reads thumbs)")
    a.add_argument("--kind", choices=("rate", "mean"), default="rate")
    a.add_argument("--shares", default="A=0.5,B=0.5", help="configured split, ARM=SHARE,...")
    a.add_argument("--control", default="A")
    a.add_argument("--treatment", default="B")
    a.add_argument("--alpha", type=positive_float, default=0.05)
    a.add_argument("--lower-is-better", action="store_true", help="e.g. latency")
    a.add_argument("--look-every", type=int_at_least(1), default=100, help="rows per arm between sequential looks")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_ab)

    r = sub.add_parser("alerts", parents=[win], help="evaluate alert rules over rows, window by window",
                       formatter_class=HelpFormatter,
                       epilog="examples:\n  lmstack monitor alerts rows.jsonl --rules rules.yaml --jsonl alerts.jsonl\n"
                              "  lmstack monitor alerts rows.jsonl --rules rules.yaml --webhook http://host/hook")
    r.add_argument("rows", metavar="ROWS.jsonl")
    r.add_argument("--rules", required=True, metavar="FILE", help="YAML/JSON list of {metric, op, threshold, ...}")
    r.add_argument("--reference", default=None, metavar="REF.jsonl",
                   help="also compute drift against these rows, so rules can use drift.<signal> (statistic / "
                        "threshold, > 1: drifted) and drift.<signal>.statistic")
    r.add_argument("--jsonl", default=None, metavar="FILE", help="append events to this JSONL file")
    r.add_argument("--webhook", default=None, metavar="URL", help="POST each event as JSON to this URL")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_alerts)

    rep = sub.add_parser("report", help="the static HTML dashboard (traffic, latency, drift, feedback, A/B)",
                         formatter_class=HelpFormatter,
                         epilog="examples:\n"
                                "  lmstack monitor report cur.jsonl --reference ref.jsonl --out monitor.html")
    rep.add_argument("rows", metavar="ROWS.jsonl", help="the rows to show")
    rep.add_argument("--reference", default=None, metavar="REF.jsonl", help="reference rows: adds the drift section")
    rep.add_argument("--drift", default=None, metavar="DRIFT.json", help="a saved drift report instead")
    rep.add_argument("--ab", default=None, metavar="AB.json", help="a saved A/B readout (monitor ab --json)")
    rep.add_argument("--out", default="monitor.html", metavar="FILE")
    rep.set_defaults(func=cmd_report)

    try:  # the log store's commands (log, export, feedback) live in their own module
        from lmstack.monitor.cli_log import register_log_commands
    except ImportError:
        pass
    else:
        register_log_commands(sub)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _drift_config(args: argparse.Namespace) -> Any:
    from lmstack.monitor.drift import config_from_dict

    cfg: dict[str, Any] = {}
    if args.config:
        from pathlib import Path

        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config {path} does not exist")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: expected a mapping of DriftConfig fields")
        cfg.update(data)
    cfg["window_s"] = args.window if args.window != 3600.0 or "window_s" not in cfg else cfg["window_s"]
    if args.period is not None:
        try:
            cfg["period"] = float(args.period)
        except ValueError:
            cfg["period"] = args.period
    for flag, key in (("baseline", "reference"), ("alpha", "alpha"), ("consecutive", "consecutive"),
                      ("clear_after", "clear_after"), ("min_rows", "min_rows"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            cfg[key] = getattr(args, flag)
    if args.signals:
        cfg["signals"] = [s.strip() for s in args.signals.split(",") if s.strip()]
    return config_from_dict(cfg)


def cmd_drift(args: argparse.Namespace) -> int:
    from lmstack.monitor.drift import drift_report
    from lmstack.monitor.rows import embedder, read_rows_jsonl

    cfg = _drift_config(args)
    report = drift_report(read_rows_jsonl(args.reference), read_rows_jsonl(args.current), cfg,
                          embed=embedder(args.embedder))
    if args.out:
        from lmstack.runs import atomic_write_json

        atomic_write_json(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
        return 0
    print(f"drift: {report['current_rows']} current rows vs {report['reference_rows']} reference rows, "
          f"{len(report['windows'])} windows of {report['window_s'] / 3600:g} h, {report['mode']} reference"
          + (f" ({report['mode_note']})" if report["mode_note"] else ""))
    print(f"{'signal':<14} {'test':<19} {'threshold':>10} {'last':>10} {'max':>10} {'drifted':>9}  alert")
    for s, v in report["signals"].items():
        def f(x: Any) -> str:
            return "-" if x is None else f"{x:.4g}"
        print(f"{s:<14} {v['test']:<19} {f(v['threshold']):>10} {f(v['statistic']):>10} {f(v['max_statistic']):>10} "
              f"{str(v['drifted_windows']) + '/' + str(v['windows']):>9}  {'ALERT' if v['drifted'] else '-'}")
    for a in report["alerts"]:
        print(f"alert: {a['signal']} opened {a['opened_iso']}"
              + (" (resolved)" if a["resolved_at"] else " (open)"))
    if not report["alerts"]:
        print("no alerts")
    return 0


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    from pathlib import Path

    from lmstack.errors import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"rows file {p} does not exist")
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{p}:{i}: a row must be a JSON object")
            rows.append(obj)
    if not rows:
        raise DataError(f"rows file {p} is empty")
    return rows


def _store_rows(url: str) -> list[dict[str, Any]]:
    """Every interaction of the log store (``lmstack.monitor.store``, docs/monitor.md) as a row dict, with its
    feedback attached (so ``--metric thumbs_up`` reads the thumbs)."""
    import dataclasses

    try:
        from lmstack.monitor.store import open_store
    except ImportError:
        raise LmstackError("monitor ab --store: this installation has no log store (lmstack.monitor.store)") from None
    from lmstack.monitor.rows import attach_feedback

    store = open_store(url)
    try:
        rows = [dataclasses.asdict(r) for r in store.rows()]
        feedback = store.feedback()
    finally:
        store.close()
    if not rows:
        raise LmstackError(f"monitor ab --store {url}: the store has no interactions")
    return attach_feedback(rows, feedback)


def cmd_ab(args: argparse.Namespace) -> int:
    from lmstack.monitor.ab import decide, parse_shares

    if (args.rows is None) == (args.store is None):
        raise ConfigError("monitor ab: give ROWS.jsonl or --store URL (one of them)")
    rows = _read_jsonl(args.rows) if args.rows else _store_rows(args.store)
    out = decide(rows, args.metric, args.kind, parse_shares(args.shares), args.control,
                 args.treatment, args.alpha, not args.lower_is_better, args.look_every)
    if args.json:
        from lmstack.monitor.drift import json_ready

        print(json.dumps(json_ready(out), indent=2, allow_nan=False))
        return 0
    srm = out["srm"]
    print(f"SRM: counts {srm['counts']}, p = {srm['p_value']:.3g} ({'FLAGGED' if srm['flagged'] else 'ok'})")
    for arm, v in out.get("arms", {}).items():
        val = v.get("rate", v.get("mean"))
        print(f"  {arm}: n={v['n']} {args.kind}={val:.4g} 95% CI [{v['ci'][0]:.4g}, {v['ci'][1]:.4g}] "
              f"({v['interval']})")
    print(f"recommendation: {out['recommendation']}")
    print(out["reasoning"])
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    from lmstack.monitor.alerts import JsonlSink, LogSink, WebhookSink, evaluate_rules, load_rules, window_metrics
    from lmstack.monitor.rows import read_rows_jsonl

    rules = load_rules(args.rules)
    sinks: list[Any] = [LogSink()]
    if args.jsonl:
        sinks.append(JsonlSink(args.jsonl))
    if args.webhook:
        sinks.append(WebhookSink(args.webhook))
    rows = read_rows_jsonl(args.rows)
    if not rows:
        raise LmstackError(f"rows file {args.rows} has no rows")
    series = window_metrics(rows, args.window)
    if args.reference:
        from lmstack.monitor.drift import drift_metrics, drift_report

        per_window = drift_metrics(drift_report(read_rows_jsonl(args.reference), rows, {"window_s": args.window}))
        series = [(t, {**m, **per_window.get(t, {})}) for t, m in series]
    events = evaluate_rules(rules, series, sinks)
    if args.json:
        print(json.dumps(events, indent=2))
    else:
        for ev in events:
            print(f"{ev['event']:<8} {ev['severity']:<8} {ev['rule']}: value {ev['value']:.4g} (window {ev['window']})")
        print(f"{len(events)} event(s) from {len(rules)} rule(s) over {len(rows)} rows")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lmstack.monitor.dashboard import render_dashboard
    from lmstack.monitor.rows import read_rows_jsonl
    from lmstack.runs import read_json

    rows = read_rows_jsonl(args.rows)
    drift = None
    if args.reference:
        from lmstack.monitor.drift import drift_report

        drift = drift_report(read_rows_jsonl(args.reference), rows)
    elif args.drift:
        drift = read_json(args.drift)
    ab = read_json(args.ab) if args.ab else None
    path = render_dashboard(rows, drift, args.out, ab=ab)
    print(f"wrote {path}", file=sys.stderr)
    return 0
