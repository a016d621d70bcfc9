"""lmstack.monitor: evaluate a model once it is live.

The interaction log and the feedback on it (:mod:`lmstack.monitor.store`, :mod:`lmstack.monitor.feedback`,
the review pages of :mod:`lmstack.monitor.web`); drift, alerts and A/B tests read the log's rows.
"""
