"""Helpers shared by the Lua hook specs (test_hooks*.py): a gateway started on a config of
hooks (with script files next to the config when asked), one-worker bookkeeping, error-log
waits and the checks of the gateway's JSON 500 for a failed script.

Not a test module itself (pytest collects test_*.py only); the specs import it from their
own folder."""

import contextlib
import json
import os
import tempfile
import time

from mgtest import Client, Gateway, error_json, parse_responses, raw, request, wait_for


LISTEN = 'listen { port = {port}, host = "127.0.0.1" }\n'


@contextlib.contextmanager
def _files_in_gateway_tmp(files):
    """While active, the temp dir a Gateway makes for its config gets FILES (relative path ->
    text) written into it first, so that "file.lua" paths relative to the config resolve."""
    real = tempfile.mkdtemp

    def mkdtemp(*a, **kw):
        d = real(*a, **kw)
        for rel, text in files.items():
            path = os.path.join(d, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
        return d

    tempfile.mkdtemp = mkdtemp
    try:
        yield
    finally:
        tempfile.mkdtemp = real


def hook_gateway(body, up=None, workers=1, files=None, **kw):
    """A Gateway on 127.0.0.1 with BODY (routes, hooks, shared, lua blocks) after a listener
    and upstream "u" pointing at UP (an Upstream). FILES: scripts written
    next to the config (relative path -> text) before the gateway starts."""
    config = LISTEN
    # Without UP, "u" names a port nothing listens on (routes that proxy answer 502).
    config += 'upstream "u" { "%s" }\n' % (up.addr if up is not None else "127.0.0.1:1")
    config += body
    if files:
        with _files_in_gateway_tmp(files):
            return Gateway(config, workers=workers, **kw)
    return Gateway(config, workers=workers, **kw)


def get(g, path, headers=None, timeout=5):
    return request(g.port, "GET", path, headers=headers, timeout=timeout)


def one_worker(g):
    """The pid of the gateway's only worker (the gateway must run with workers=1)."""
    pids = wait_for(lambda: g.worker_pids(), timeout=3)
    assert len(pids) == 1, "expected one worker, got %s" % pids
    return pids[0]


def assert_same_worker(g, pid):
    """The worker PID is still the only worker, and the master never saw a worker exit."""
    assert g.worker_pids() == [pid], "worker %d was replaced: %s\n%s" % (
        pid, g.worker_pids(), g.stderr_text()[-3000:])
    assert "exited with status" not in g.stderr_text() and "killed by signal" not in \
        g.stderr_text(), g.stderr_text()[-3000:]


def wait_log(g, needle, timeout=3.0):
    """Waits until NEEDLE shows in the gateway's stderr; returns the whole text."""
    text = wait_for(lambda: needle in g.stderr_text() and g.stderr_text(), timeout=timeout)
    assert text, "%r not in the error log:\n%s" % (needle, g.stderr_text()[-4000:])
    return text


def log_entry(g, request_id, timeout=3.0):
    """The error-log text from the line that names REQUEST_ID up to the next log line (a
    traceback spans several lines)."""
    text = wait_log(g, "request %s:" % request_id, timeout)
    start = text.index("request %s:" % request_id)
    lines = text[start:].split("\n")
    out = [lines[0]]
    for line in lines[1:]:
        if line[:4].isdigit() and "pid=" in line:     # the next timestamped line
            break
        out.append(line)
    return "\n".join(out)


def config_line(g, marker):
    """1-based line of the gateway's config text holding MARKER (for file:line checks)."""
    for i, line in enumerate(g.config.split("\n"), 1):
        if marker in line:
            return i
    raise AssertionError("%r not in the config" % marker)


def assert_script_error(resp):
    """RESP is the gateway's answer to a failed script: JSON 500 "script error" with the same
    request id as its X-Request-Id header. Returns the request id."""
    assert resp.status == 500, resp
    # The gateway's own answer, also where it replaces an upstream's response.
    assert resp.header("server") == "moongate", resp.headers
    doc = error_json(resp)
    assert doc["error"] == "script error", doc
    assert doc["request_id"] == resp.header("x-request-id"), (doc, resp.headers)
    return doc["request_id"]


def raw_get(port, path, headers=(), timeout=5.0):
    """GET PATH with Connection: close on a raw socket; returns (all bytes, responses)."""
    head = "GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" % path
    head += "".join("%s: %s\r\n" % kv for kv in headers) + "\r\n"
    data = raw(port, head.encode("latin-1"), timeout=timeout)
    return data, parse_responses(data)


def shared_value(g, key, route="/_shared"):
    """The value of KEY in the dictionary served by ROUTE (see SHARED_READER)."""
    r = get(g, "%s?k=%s" % (route, key))
    assert r.status == 200, r
    return json.loads(r.body)["v"]


# A route that shows one key of a shared dictionary "d" as {"v": value}; pair it with
# `shared "d" { size = "1m" }`.
SHARED_READER = ('route "GET /_shared" { handler = function(req) '
                 'local v = mg.shared.d:get(req.args.k) '
                 'return 200, { v = v == nil and mg.json.null or v } end }\n')


def timed(fn):
    """Runs fn() and returns (its result, seconds it took)."""
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


__all__ = ["LISTEN", "hook_gateway", "get", "one_worker", "assert_same_worker",
           "wait_log", "log_entry", "config_line", "assert_script_error", "raw_get", "shared_value",
           "SHARED_READER", "timed", "Client"]
