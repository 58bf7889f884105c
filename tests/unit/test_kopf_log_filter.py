"""kopf's startup warning about resources the cluster does not serve: where LeaderWorkerSet (an optional
prerequisite) is the only one, the operator says so at INFO instead of a warning that looks like a fault."""
from __future__ import annotations

import logging

from llama_operator.runner import LeaderWorkerSetAbsent, install_leaderworkerset_filter

LWS = "Selector(group='leaderworkerset.x-k8s.io', version='v1', any_name='leaderworkersets')"
TYPO = "Selector(group='llama-operator.dev', version='v1alpha1', any_name='llamadeploymentz')"


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("kopf._core.reactor.observation", logging.WARNING, __file__, 1,
                             "Unresolved resources cannot be served (try creating their CRDs): %s", (message,), None)


def test_leaderworkerset_alone_is_said_at_info():
    record = _record(LWS)
    assert LeaderWorkerSetAbsent().filter(record)
    assert record.levelno == logging.INFO and record.levelname == "INFO"
    assert record.getMessage() == ("LeaderWorkerSet is not installed: replicas stay on one node until its CRD "
                                   "appears (docs/multinode.md)")


def test_any_other_unresolved_resource_keeps_kopfs_warning():
    for listed in (TYPO, f"{LWS}, {TYPO}"):
        record = _record(listed)
        assert LeaderWorkerSetAbsent().filter(record)
        assert record.levelno == logging.WARNING and listed in record.getMessage()


def test_installed_once_on_kopfs_discovery_logger(caplog):
    observation = logging.getLogger("kopf._core.reactor.observation")
    try:
        install_leaderworkerset_filter()
        install_leaderworkerset_filter()
        assert sum(isinstance(f, LeaderWorkerSetAbsent) for f in observation.filters) == 1
        with caplog.at_level(logging.INFO, logger="kopf._core.reactor.observation"):
            observation.warning("Unresolved resources cannot be served (try creating their CRDs): " + LWS)
        assert [(r.levelname, r.getMessage()[:33]) for r in caplog.records] == \
            [("INFO", "LeaderWorkerSet is not installed:")]
    finally:
        for f in [f for f in observation.filters if isinstance(f, LeaderWorkerSetAbsent)]:
            observation.removeFilter(f)
