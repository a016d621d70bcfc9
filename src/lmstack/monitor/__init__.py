"""lmstack.monitor: keep evaluating a live model.

The interaction log and the feedback on it (:mod:`lmstack.monitor.store`, :mod:`lmstack.monitor.feedback`, the
review pages of :mod:`lmstack.monitor.web`); drift with seasonality, alerts, A/B tests and a static dashboard
read the log's rows (:mod:`lmstack.monitor.drift`, :mod:`~lmstack.monitor.alerts`, :mod:`~lmstack.monitor.ab`,
:mod:`~lmstack.monitor.dashboard`). See docs/monitor.md.
"""
