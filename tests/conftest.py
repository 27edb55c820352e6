"""How the suite splits over pytest-xdist workers (`make test` runs `-n N --dist loadfile
--no-loadscope-reorder`).

A worker takes whole modules, so a module's module- and session-scoped fixtures (a corpus, a
Slurm cluster, DeepSpeed runs) are built once, on one worker. Every worker sorts the modules the
same way, those with slow tests first (the longest jobs first keeps the last worker from finishing
minutes after the others), and xdist hands them out in that order. The two-minute pretraining
run that three modules share is made once for all workers (tests/train/conftest.py,
`shared_across_workers`). Without xdist nothing changes.
"""

from __future__ import annotations

import pytest

from tests.support import SUMMARY


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # an xdist worker: every worker sorts the same way
        module = {item: item.nodeid.split("::")[0] for item in items}
        slow = {module[item] for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: module[item] not in slow)  # stable: collection order within


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: its figures go to the controller
        session.config.workeroutput["summary"] = SUMMARY


@pytest.hookimpl(optionalhook=True)  # an xdist hook, in the controller
def pytest_testnodedown(node, error):
    for section, figures in getattr(node, "workeroutput", {}).get("summary", {}).items():
        SUMMARY.setdefault(section, {}).update(figures)


def pytest_terminal_summary(terminalreporter):
    for section, figures in SUMMARY.items():
        if figures:
            terminalreporter.section(section)
            for key, value in figures.items():
                terminalreporter.write_line(f"{key:28s} {value:.1f}")
