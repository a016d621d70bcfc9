"""lmstack.monitor: keep evaluating a live model -- interaction rows, drift with seasonality, alerts, A/B tests,
a static dashboard (see docs/monitor.md)."""
