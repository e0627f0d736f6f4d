"""pytest setup shared by every integration spec: makes `import mgtest` work from any
folder under spec/, and stops whatever a test started (gateways by PID, upstream threads)
even when the test failed halfway."""

import os
import sys

import pytest

SPEC_DIR = os.path.dirname(os.path.abspath(__file__))
if SPEC_DIR not in sys.path:
    sys.path.insert(0, SPEC_DIR)

import mgtest  # noqa: E402  (needs the path above)

@pytest.fixture(autouse=True)
def _mg_cleanup():
    """Runs the test, then stops every Gateway and Upstream it left running."""
    del mgtest._started_gateways[:]
    yield
    mgtest.cleanup_all()


@pytest.fixture
def upstream():
    """A default upstream (every request answered 200 "ok"), stopped after the test."""
    with mgtest.Upstream() as u:
        yield u


@pytest.fixture
def echo_upstream():
    """An upstream answering each request with a JSON description of what it received."""
    with mgtest.Upstream.echo() as u:
        yield u


def pytest_runtest_makereport(item, call):
    """On failure, attach the gateway's stderr to the report (what the binary said)."""
    if call.when == "call" and call.excinfo is not None:
        for g in list(mgtest._started_gateways):
            try:
                text = g.stderr_text()
            except OSError:
                continue
            if text.strip():
                item.add_report_section("call", "moongate stderr (pid %d)" % g.pid, text[-4000:])


def pytest_sessionfinish(session, exitstatus):
    """Removes the temp dirs of every gateway started (keeps them when MG_KEEP_TMP=1)."""
    if os.environ.get("MG_KEEP_TMP") == "1":
        return
    for d in mgtest._all_tmp_dirs:
        mgtest.remove_tmp(d)
