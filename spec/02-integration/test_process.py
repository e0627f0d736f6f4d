"""The master and its workers: how many run, respawn after a crash, graceful stop (SIGTERM,
SIGINT, `moongate stop`), the drain deadline, and the one-line errors that end a start.

Workers are found from /proc (children of the master); every process is stopped by PID."""

import http.client
import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest

from mgtest import Gateway, Upstream, http_response, moongate_bin, request, wait_for

HELLO = ('listen { port = {port}, host = "127.0.0.1" }\n'
         'route "GET /hello" { respond = { 200, "hello\\n" } }\n')


def proxy_config(up_port, gateway_block=""):
    return (gateway_block +
            'listen { port = {port}, host = "127.0.0.1" }\n'
            'upstream "u" { "127.0.0.1:%d", timeout = "10s" }\n'
            'route "/*" { upstream = "u" }\n' % up_port)


def gateway_block(**extra):
    fields = ['pid_file = "{tmp}/moongate.pid"', 'access_log = "{tmp}/access.log"',
              'error_log = "stderr"'] + ['%s = %s' % kv for kv in extra.items()]
    return "gateway { " + ", ".join(fields) + " }\n"


def try_request(port, path, timeout=3):
    """A request that reports failure instead of raising: returns the Response or None."""
    try:
        return request(port, "GET", path, timeout=timeout)
    except (OSError, http.client.HTTPException):
        return None


def connection_refused(port):
    """True when a TCP connect to 127.0.0.1:port is refused right now."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=0.2)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    s.close()
    return False


def in_background(fn):
    """Runs fn() in a thread; returns (thread, result dict with "value" or "error")."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as e:  # handed to the test, which asserts on it
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def slow_handler(delay, body=b"finished", release=None):
    """An upstream handler that answers one request per connection after DELAY seconds (or
    when RELEASE is set, if given)."""
    def handler(conn):
        if conn.read_request(timeout=5) is None:
            return
        if release is not None:
            release.wait(delay)
        else:
            time.sleep(delay)
        conn.send(http_response(200, body))
    return handler


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------

def test_w2_starts_two_workers():
    with Gateway(HELLO, workers=2) as gw:
        pids = gw.worker_pids()
        assert len(pids) == 2, pids
        assert gw.pid not in pids
        for _ in range(4):
            r = request(gw.port, "GET", "/hello")
            assert r.status == 200 and r.body == b"hello\n"
        assert gw.stop() == 0


def test_killed_worker_is_respawned_and_service_continues():
    with Gateway(HELLO, workers=2) as gw:
        before = gw.worker_pids()
        assert len(before) == 2, before
        results = []  # (start time, ok)
        lock = threading.Lock()
        end = time.monotonic() + 3.0

        def load():
            while time.monotonic() < end:
                t = time.monotonic()
                r = try_request(gw.port, "/hello", timeout=2)
                ok = r is not None and r.status == 200 and r.body == b"hello\n"
                with lock:
                    results.append((t, ok))

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        victim = before[0]
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        new = wait_for(lambda: [p for p in gw.worker_pids() if p not in before],
                       timeout=2.0, interval=0.01)
        t_new = time.monotonic()
        for t in threads:
            t.join(5)
        assert new, "no new worker within 2 s of killing %d" % victim
        assert t_new - t_kill < 1.0, "respawn took %.2f s" % (t_new - t_kill)
        after = gw.worker_pids()
        assert len(after) == 2 and victim not in after and new[0] in after, after
        early_failures = [t for t, ok in results if t < t_new and not ok]
        late = [ok for t, ok in results if t >= t_new]
        # Only the request the killed worker was serving may fail.
        assert len(early_failures) <= 2, len(early_failures)
        assert len(late) >= 20, len(late)
        assert all(late), "%d of %d requests failed after the respawn" % (
            late.count(False), len(late))
        assert gw.stop() == 0


# ---------------------------------------------------------------------------------------------
# Graceful stop
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_lets_the_in_flight_request_finish(sig):
    with Upstream(slow_handler(1.0)) as up, Gateway(proxy_config(up.port)) as gw:
        t, out = in_background(lambda: request(gw.port, "GET", "/slow", timeout=5))
        assert up.wait_requests(1, timeout=3), "the request never reached the upstream"
        t_sig = time.monotonic()
        gw.signal(sig)
        assert wait_for(lambda: connection_refused(gw.port), timeout=0.5, interval=0.02), \
            "new connections still accepted after the stop began"
        t.join(5)
        assert "error" not in out, out.get("error")
        r = out["value"]
        assert r.status == 200 and r.body == b"finished", r
        code = gw.wait_exit(5)
        assert code == 0, gw.stderr_text()
        assert time.monotonic() - t_sig < 3.0
        # The finished request made it into the access log before the exit.
        logged = [(e.get("path"), e.get("status")) for e in gw.access_log(n=1, timeout=0)]
        assert logged == [("/slow", 200)], logged


def test_drain_timeout_cuts_a_request_that_runs_too_long():
    release = threading.Event()
    with Upstream(slow_handler(8.0, release=release)) as up:
        config = proxy_config(up.port, gateway_block(drain_timeout='"1s"'))
        try:
            with Gateway(config) as gw:
                t, out = in_background(lambda: request(gw.port, "GET", "/long", timeout=8))
                assert up.wait_requests(1, timeout=3)
                t0 = time.monotonic()
                gw.signal(signal.SIGTERM)
                code = gw.wait_exit(4)
                elapsed = time.monotonic() - t0
                assert code == 0, gw.stderr_text()
                assert 0.8 <= elapsed <= 2.5, "exited %.2f s after SIGTERM" % elapsed
                t.join(2)
                assert not t.is_alive(), "the cut request's client connection was left open"
                if "value" in out:
                    assert out["value"].status != 200, out["value"]
        finally:
            release.set()


def stop_with_cli(gw, timeout):
    """Runs `moongate stop -c CONFIG`; returns (the gateway's exit code, stop's exit code, stop's
    output). `moongate stop` may wait for the master to go away; the master is our child, so
    it is reaped here meanwhile (a zombie would otherwise look alive to it)."""
    stopper = subprocess.Popen([moongate_bin(), "stop", "-c", gw.config_path],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        code = gw.wait_exit(timeout)
        out, _ = stopper.communicate(timeout=timeout)
    finally:
        if stopper.poll() is None:
            stopper.kill()
            stopper.wait()
    return code, stopper.returncode, out


def test_stop_command_stops_the_master_and_removes_the_pid_file():
    config = gateway_block() + HELLO
    with Gateway(config) as gw:
        pid_file = os.path.join(gw.tmp, "moongate.pid")
        assert wait_for(lambda: os.path.exists(pid_file), timeout=2)
        with open(pid_file) as f:
            assert int(f.read().strip()) == gw.pid
        code, rc, out = stop_with_cli(gw, 5)
        assert code == 0, gw.stderr_text()
        assert rc == 0, out
        assert not os.path.exists(pid_file)
        assert connection_refused(gw.port)


def test_stop_with_a_config_that_no_longer_loads_stops_nothing_it_cannot_name():
    """`moongate stop -c FILE` on a FILE that no longer loads cannot know the pid file FILE
    names: it stops nothing (not the default pid file's gateway either) and says so."""
    with Gateway(gateway_block() + HELLO) as gw:
        with open(gw.config_path, "a") as f:
            f.write('route "GET /x" {\n')
        r = subprocess.run([moongate_bin(), "stop", "-c", gw.config_path], text=True,
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert re.search(re.escape(gw.config_path) + r":\d+: ", r.stderr), r.stderr   # file:line
        assert "nothing was stopped" in r.stderr, r.stderr
        assert "send SIGTERM to the master" in r.stderr, r.stderr
        assert request(gw.port, "GET", "/hello").body == b"hello\n"


@pytest.mark.skipif(os.path.exists("/tmp/moongate.pid"),
                    reason="a gateway runs on the default pid file")
def test_stop_with_a_config_that_no_longer_loads_stops_its_gateway_on_the_default_pid_file():
    """With the default pid file, the gateway there is stopped when it runs that very file."""
    with Gateway('gateway { access_log = "{tmp}/access.log", error_log = "stderr" }\n' +
                 HELLO) as gw:
        assert wait_for(lambda: os.path.exists("/tmp/moongate.pid.status"), timeout=3)
        with open(gw.config_path, "a") as f:
            f.write('route "GET /x" {\n')
        code, rc, out = stop_with_cli(gw, 10)
        assert code == 0, gw.stderr_text()
        assert rc == 0, out
        assert "stopping the gateway that runs it" in out, out
        assert not os.path.exists("/tmp/moongate.pid")


# ---------------------------------------------------------------------------------------------
# Start-up errors
# ---------------------------------------------------------------------------------------------

def stderr_lines(gw):
    return [line for line in gw.stderr_text().splitlines() if line.strip()]


def test_port_in_use_is_one_clear_line_and_exit_1():
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen(8)
        port = busy.getsockname()[1]
        config = ('listen { port = {busy}, host = "127.0.0.1" }\n'
                  'route "/" { respond = { 200, "x" } }\n')
        with Gateway(config, wait=False, busy=port) as gw:
            code = gw.wait_exit(5)
            lines = stderr_lines(gw)
            assert code == 1, lines
            assert len(lines) == 1, lines
            assert str(port) in lines[0] and "in use" in lines[0].lower(), lines
    finally:
        busy.close()


BAD_CONFIGS = {
    # name: (line 3 of the config, a word the message must contain)
    "unknown-upstream": ('route "GET /x" { upstream = "nowhere" }', "nowhere"),
    "syntax-error": ('route "GET /x" { upstream = }', ""),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_is_reported_with_file_and_line_and_exit_1(name):
    line3, word = BAD_CONFIGS[name]
    config = (gateway_block() +                                   # line 1
              'listen { port = {port}, host = "127.0.0.1" }\n' +  # line 2
              line3 + "\n")                                       # line 3
    with Gateway(config, wait=False) as gw:
        code = gw.wait_exit(5)
        lines = stderr_lines(gw)
        assert code == 1, lines
        assert len(lines) == 1, lines
        assert re.search(r"gateway\.lua:3: ", lines[0]), lines
        assert word in lines[0], lines
        assert connection_refused(gw.port)
