"""Reload without restart: SIGHUP, `moongate reload`, admin POST /reload and --watch switch the
running gateway to the config file's new contents; a bad file is rejected (file:line) while the
old generation keeps serving; in-flight requests finish on their generation; upstream
keep-alive connections and shared dictionaries survive; nothing fails under load and nothing
grows over many reloads.

Every gateway here has an admin listener: /status tells which generation the master accepted
and which one each worker serves. Configs are rewritten in place (write + rename, so that a
reader never sees half a file). Every process is stopped by PID (mgtest.Gateway)."""

import http.client
import json
import os
import re
import signal
import tempfile
import threading
import time

import pytest

import mgtest
from mgtest import Client, Gateway, Upstream, free_port, request, rss_kib, run_cli, wait_for

# Lines 1-3 of every config; the test's own lines start at line 4.
HEAD = ('gateway { pid_file = "{tmp}/moongate.pid", access_log = "{tmp}/access.log", '
        'error_log = "stderr" }\n'
        'listen { port = {port}, host = "127.0.0.1" }\n'
        'admin { port = {admin}, host = "127.0.0.1" }\n')

V1 = ('route "GET /v" { handler = function(req) return 200, "v1" end }\n'      # line 4
      'route "GET /old" { respond = { 200, "old" } }\n')                        # line 5
V2 = ('route "GET /v" { handler = function(req) return 200, "v2" end }\n'
      'route "GET /new" { respond = { 200, "new" } }\n')


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def substitute(text, subst):
    for k, v in subst.items():
        text = text.replace("{%s}" % k, str(v))
    return text


def write_file(path, text):
    """Replaces PATH atomically (a dot-file next to it, then rename)."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def new_dir():
    """A temp dir (handler scripts, configs), removed at the end of the session."""
    d = tempfile.mkdtemp(prefix="mgtest-dir-")
    mgtest._all_tmp_dirs.append(d)
    return d


def start(body, workers=2, args=(), head=HEAD, config_dir=None, **fmt):
    """A gateway on HEAD + BODY with an admin listener (gw.admin), returned once every worker
    serves generation 1. gw.fmt keeps the substitutions for write_config.

    config_dir: put the config file there instead of the harness's temp dir (which also holds
    the gateway's stderr file: a --watch gateway would see it change)."""
    admin = free_port()
    if config_dir is None:
        gw = Gateway(head + body, workers=workers, args=args, admin=admin, **fmt)
        gw.fmt = dict(fmt, admin=admin, port=gw.port, tmp=gw.tmp)
    else:
        subst = dict(fmt, admin=admin, port=free_port(), tmp=new_dir())
        path = os.path.join(config_dir, "gateway.lua")
        text = substitute(head + body, subst)
        write_file(path, text)
        # The later -c wins: the gateway runs on PATH (Gateway's own copy is not used).
        gw = Gateway(text, workers=workers, args=list(args) + ["-c", path])
        gw.port, gw.config_path, gw.fmt = subst["port"], path, subst
    gw.admin = admin
    wait_switched(gw, 1)
    return gw


def write_config(gw, body, head=HEAD, **fmt):
    """Replaces the gateway's config file with HEAD + BODY."""
    write_file(gw.config_path, substitute(head + body, dict(gw.fmt, **fmt)))


def status(gw, timeout=5):
    r = request(gw.admin, "GET", "/status", timeout=timeout)
    assert r.status == 200, r
    return r.json()


def all_switched(gw, gen):
    st = status(gw)
    ws = st["workers"]
    ok = (st["generation"] == gen and len(ws) == gw.workers and
          all(w["pid"] > 0 and w["generation"] == gen for w in ws))
    return st if ok else None


def wait_switched(gw, gen, timeout=5.0):
    """Waits until the master accepted generation GEN and every worker serves it."""
    st = wait_for(lambda: all_switched(gw, gen), timeout=timeout, interval=0.005)
    assert st, "generation %d not served by every worker within %.0f s: %s\n%s" % (
        gen, timeout, json.dumps(status(gw)), gw.stderr_text()[-2000:])
    return st


def reload_cli(gw, timeout=40):
    return run_cli(["reload", "-c", gw.config_path], timeout=timeout)


def post_reload(gw):
    return request(gw.admin, "POST", "/reload", body=b"", timeout=40)


def bodies(gw, path, n=10):
    """(status, body) of N requests on fresh connections (so that every worker answers some)."""
    out = []
    for _ in range(n):
        r = request(gw.port, "GET", path)
        out.append((r.status, r.body))
    return out


def assert_serves_only(gw, path, body, n=10):
    got = bodies(gw, path, n)
    assert got == [(200, body)] * n, got


def assert_v1(gw):
    assert_serves_only(gw, "/v", b"v1")
    assert request(gw.port, "GET", "/old").body == b"old"
    assert request(gw.port, "GET", "/new").status == 404


def assert_v2(gw):
    assert_serves_only(gw, "/v", b"v2")
    assert request(gw.port, "GET", "/old").status == 404
    r = request(gw.port, "GET", "/new")
    assert (r.status, r.body) == (200, b"new"), r


def worker_rss(gw):
    """Sum of VmRSS (KiB) of the workers that /status names."""
    pids = [w["pid"] for w in status(gw)["workers"]]
    vals = [rss_kib(p) for p in pids]
    assert None not in vals, (pids, vals)
    return sum(vals)


def try_get(port, path, timeout=3):
    """(status, body) of one request, or (None, the error) when it fails."""
    try:
        r = request(port, "GET", path, timeout=timeout)
        return r.status, r.body
    except (OSError, http.client.HTTPException) as e:
        return None, repr(e)


# ---------------------------------------------------------------------------------------------
# 1. Each way of reloading switches the answers and the routes
# ---------------------------------------------------------------------------------------------

def test_sighup_switches_routes_and_answers():
    with start(V1) as gw:
        assert_v1(gw)
        pids = gw.worker_pids()
        write_config(gw, V2)
        gw.signal(signal.SIGHUP)
        st = wait_switched(gw, 2)
        assert st["reloads"] == 1 and st["reload_failures"] == 0, st
        assert st["last_reload"]["ok"] is True and "error" not in st["last_reload"], st
        assert_v2(gw)
        # The workers switch in place: none of them is restarted.
        assert gw.worker_pids() == pids
        assert sorted(w["pid"] for w in st["workers"]) == pids
        assert "respawning" not in gw.stderr_text()
        assert gw.stop() == 0


def test_moongate_reload_waits_for_every_worker_and_says_the_generation():
    with start(V1) as gw:
        st = status(gw)
        assert st["generation"] == 1 and st["reloads"] == 0 and st["last_reload"] is None, st
        write_config(gw, V2)
        p = reload_cli(gw)
        assert p.returncode == 0, (p.stdout, p.stderr)
        assert p.stdout == "moongate: reloaded %s: generation 2\n" % gw.config_path, p.stdout
        assert p.stderr == "", p.stderr
        # It returned once every worker had switched: no request may see v1 any more.
        assert_v2(gw)
        st = status(gw)
        assert st["generation"] == 2 and st["reloads"] == 1, st
        assert [w["generation"] for w in st["workers"]] == [2, 2], st
        # And back: the generation counts every successful reload.
        write_config(gw, V1)
        p = reload_cli(gw)
        assert (p.returncode, p.stdout) == (
            0, "moongate: reloaded %s: generation 3\n" % gw.config_path), (p.stdout, p.stderr)
        assert_v1(gw)
        # Reloading an unchanged file makes a new generation too.
        p = reload_cli(gw)
        assert p.returncode == 0 and p.stdout.endswith(": generation 4\n"), (p.stdout, p.stderr)
        st = status(gw)
        assert st["generation"] == 4 and st["reloads"] == 3 and st["reload_failures"] == 0, st
        assert all(w["generation"] == 4 for w in st["workers"]), st
        assert_v1(gw)
        assert gw.stop() == 0


def test_moongate_reload_without_a_running_gateway_fails():
    with start(V1) as gw:
        path = gw.config_path
        assert gw.stop() == 0
    p = run_cli(["reload", "-c", path])
    assert p.returncode == 1, p
    assert p.stdout == ""
    assert "moongate.pid" in p.stderr and "running" in p.stderr, p.stderr


def test_admin_post_reload_answers_once_the_workers_switched():
    with start(V1) as gw:
        write_config(gw, V2)
        r = post_reload(gw)
        assert r.status == 200, r
        assert r.header("content-type").startswith("application/json"), r
        assert r.json() == {"ok": True, "generation": 2}, r.body
        assert_v2(gw)
        st = status(gw)
        assert st["generation"] == 2 and all(w["generation"] == 2 for w in st["workers"]), st
        write_config(gw, V1)
        r = post_reload(gw)
        assert (r.status, r.json()) == (200, {"ok": True, "generation": 3}), r
        assert_v1(gw)
        assert gw.stop() == 0


WATCH_BODY = ('route "GET /v" { handler = function(req) return 200, "%s" end }\n'
              'route "GET /h" { handler = "{h}" }\n')


def test_watch_reloads_when_the_config_or_a_handler_file_changes():
    cdir, sdir = new_dir(), new_dir()
    h = os.path.join(sdir, "h.lua")
    write_file(h, 'return function(req) return 200, "h1" end\n')
    with start(WATCH_BODY % "v1", args=["--watch"], config_dir=cdir, h=h) as gw:
        assert_serves_only(gw, "/v", b"v1", 4)
        assert_serves_only(gw, "/h", b"h1", 4)
        # The config changes: reloaded shortly after, without any command.
        t0 = time.monotonic()
        write_config(gw, WATCH_BODY % "v2")
        st = wait_switched(gw, 2, timeout=3)
        assert time.monotonic() - t0 < 2.0
        assert st["last_reload"]["ok"] is True, st
        assert_serves_only(gw, "/v", b"v2", 4)
        # The handler script changes: its directory is watched too.
        write_file(h, 'return function(req) return 200, "h2" end\n')
        wait_switched(gw, 3, timeout=3)
        assert_serves_only(gw, "/h", b"h2", 4)
        # A broken save is rejected and the running config stays...
        write_config(gw, WATCH_BODY % "v3" + 'route "GET /x" {\n')
        assert wait_for(lambda: status(gw)["reload_failures"] >= 1, timeout=3), status(gw)
        st = status(gw)
        assert st["generation"] == 3 and st["last_reload"]["ok"] is False, st
        assert re.search(r"gateway\.lua:\d+: ", st["last_reload"]["error"]), st
        assert_serves_only(gw, "/v", b"v2", 4)
        # ...until the next good save.
        write_config(gw, WATCH_BODY % "v4")
        wait_switched(gw, 4, timeout=3)
        assert_serves_only(gw, "/v", b"v4", 4)
        assert_serves_only(gw, "/h", b"h2", 4)
        # Nothing changes any more: no more reloads.
        time.sleep(0.4)
        assert status(gw)["generation"] == 4
        assert gw.stop() == 0


def test_watch_does_not_reload_on_the_gateways_own_log_writes():
    cdir = new_dir()
    head = ('gateway { pid_file = "{tmp}/moongate.pid", access_log = "{cdir}/access.log", '
            'error_log = "{cdir}/error.log" }\n' + HEAD.split("\n", 1)[1])
    with start(WATCH_BODY.split("\n")[0] % "v1" + "\n", workers=1, args=["--watch"],
               head=head, config_dir=cdir, cdir=cdir) as gw:
        # One change, one reload...
        write_config(gw, WATCH_BODY.split("\n")[0] % "v2" + "\n", head=head)
        wait_switched(gw, 2, timeout=3)
        assert_serves_only(gw, "/v", b"v2", 2)
        # ...and then the gateway is quiet: no file changed.
        gen = status(gw)["generation"]
        time.sleep(1.0)
        st = status(gw)
        assert st["generation"] == gen, "%d reloads in 1 s without any change: %s" % (
            st["generation"] - gen, st)


# ---------------------------------------------------------------------------------------------
# 2. A bad reload is rejected and the running config keeps serving
# ---------------------------------------------------------------------------------------------

BAD = {
    # name: (line 6 of the config, regexes the error must match)
    "syntax": ('route "GET /x" { handler = }', [r"gateway\.lua:6: "]),
    "runtime": ('error("boom while loading")', [r"gateway\.lua:6: .*boom while loading"]),
    "unknown-upstream": ('route "GET /x" { upstream = "nowhere" }',
                         [r"gateway\.lua:6: .*nowhere"]),
    "handler-file-fails": ('route "GET /x" { handler = "{bad}" }',
                           [r"gateway\.lua:6: .*broken\.lua",
                            r"broken\.lua:2: .*handler file broken"]),
    "handler-file-missing": ('route "GET /x" { handler = "{missing}" }',
                             [r"gateway\.lua:6: .*missing\.lua"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_reload_is_rejected_with_file_and_line_and_the_old_config_serves(name):
    line6, patterns = BAD[name]
    sdir = new_dir()
    bad = os.path.join(sdir, "broken.lua")
    write_file(bad, 'local x = 1\nerror("handler file broken")\nreturn function() end\n')
    fmt = {"bad": bad, "missing": os.path.join(sdir, "missing.lua")}
    with start(V1, **fmt) as gw:
        write_config(gw, V1 + line6 + "\n")

        # `moongate reload` checks the file first and does not touch the gateway.
        p = reload_cli(gw)
        assert p.returncode == 1, (p.stdout, p.stderr)
        assert p.stdout == "", p.stdout
        for pat in patterns:
            assert re.search(pat, p.stderr), (pat, p.stderr)
        st = status(gw)
        assert st["reloads"] == 0 and st["last_reload"] is None, st
        assert_v1(gw)

        # POST /reload: the master's check fails, 422 with the same error.
        r = post_reload(gw)
        assert r.status == 422, r
        doc = r.json()
        assert doc["ok"] is False, doc
        for pat in patterns:
            assert re.search(pat, doc["error"]), (pat, doc)
        st = status(gw)
        assert st["generation"] == 1 and st["reloads"] == 1 and st["reload_failures"] == 1, st
        assert st["last_reload"]["ok"] is False, st
        for pat in patterns:
            assert re.search(pat, st["last_reload"]["error"]), (pat, st)
        assert all(w["generation"] == 1 and "error" not in w for w in st["workers"]), st
        assert_v1(gw)

        # SIGHUP: the same, and the error log says why.
        gw.signal(signal.SIGHUP)
        assert wait_for(lambda: status(gw)["reload_failures"] == 2, timeout=3), status(gw)
        assert status(gw)["generation"] == 1
        assert wait_for(lambda: gw.stderr_text().count("reload failed") >= 2, timeout=2), \
            gw.stderr_text()
        assert_v1(gw)

        # The next good file is taken: failed attempts used no generation number.
        write_config(gw, V2)
        p = reload_cli(gw)
        assert (p.returncode, p.stdout) == (
            0, "moongate: reloaded %s: generation 2\n" % gw.config_path), p
        assert_v2(gw)
        st = status(gw)
        assert st["last_reload"]["ok"] is True and "error" not in st["last_reload"], st
        assert st["reloads"] == 3 and st["reload_failures"] == 2, st
        assert gw.stop() == 0


NOT_RELOADABLE = {
    # name: (head, extra body lines, message)
    "listener-port": (HEAD.replace("port = {port}", "port = {other}"), "",
                      "the listeners changed (restart to apply)"),
    "listener-added": (HEAD + 'listen "more" { port = {other}, host = "127.0.0.1" }\n', "",
                       "the listeners changed (restart to apply)"),
    "admin-port": (HEAD.replace("port = {admin}", "port = {other}"), "",
                   "the admin listener changed (restart to apply)"),
    "shared-size": (HEAD, 'shared "n" { size = "2m" }\n',
                    "the shared dictionaries changed (restart to apply)"),
    "shared-added": (HEAD, 'shared "n" { size = "1m" }\nshared "m" { size = "1m" }\n',
                     "the shared dictionaries changed (restart to apply)"),
    "lua-memory": (HEAD, 'lua { memory = "64m" }\n', "lua.memory changed (restart to apply)"),
    "admin-token": (HEAD.replace('port = {admin}, host = "127.0.0.1"',
                                 'port = {admin}, host = "127.0.0.1", token = "t"'), "",
                    "the admin token changed (restart to apply)"),
    "workers": (HEAD.replace('error_log = "stderr"', 'error_log = "stderr", workers = 3'), "",
                "gateway.workers changed (restart to apply)"),
}


@pytest.mark.parametrize("name", sorted(NOT_RELOADABLE))
def test_a_change_that_needs_a_restart_is_rejected(name):
    head, extra, message = NOT_RELOADABLE[name]
    other = free_port()
    with start(V1 + 'shared "n" { size = "1m" }\n', other=other) as gw:
        if name.startswith("shared"):
            write_config(gw, V2 + extra, head=head)
        else:
            write_config(gw, V2 + 'shared "n" { size = "1m" }\n' + extra, head=head)
        # The file itself is fine...
        assert run_cli(["check", "-c", gw.config_path]).returncode == 0
        # ...but the running gateway cannot take it.
        p = reload_cli(gw)
        assert p.returncode == 1, (p.stdout, p.stderr)
        assert message in p.stderr, p.stderr
        r = post_reload(gw)
        assert r.status == 422 and message in r.json()["error"], r
        st = status(gw)
        assert st["generation"] == 1 and st["last_reload"]["ok"] is False, st
        assert message in st["last_reload"]["error"], st
        assert_v1(gw)
        assert try_get(other, "/v", timeout=1)[0] is None  # nothing listens on the new port
        assert gw.stop() == 0


# With n = FITS_ONCE the config's data (~5 MB) fits the lua.memory = 8m of the master's check
# (a fresh VM under the same cap) but not a worker's VM, which also holds the running
# generation while it builds the next; with n = 100000 (~15 MB) it fits nowhere.
FITS_ONCE = 35000
BIG = ('lua { memory = "8m" }\n'
       'local big = {}\n'
       # strings differ per version: the two generations cannot share them
       'for i = 1, {n} do big[i] = string.rep("x", 100) .. "{v}" .. i end\n'
       # the handler holds BIG: it is part of the generation
       'route "GET /v" { handler = function(req) local _ = big return 200, "{v}" end }\n')


def test_a_config_over_lua_memory_is_refused_by_the_check():
    with start(BIG, n=10, v="v1") as gw:
        write_config(gw, BIG, n=100000, v="v2")
        p = reload_cli(gw)
        assert p.returncode == 1, (p.stdout, p.stderr)
        assert "gateway.lua" in p.stderr and "not enough memory" in p.stderr, p.stderr
        r = post_reload(gw)                 # the master's check says the same
        assert r.status == 422 and "not enough memory" in r.json()["error"], r.body
        assert_serves_only(gw, "/v", b"v1", 3)


def test_a_generation_the_workers_cannot_load_is_reported():
    with start(BIG, n=FITS_ONCE, v="v1") as gw:
        assert_serves_only(gw, "/v", b"v1", 4)
        write_config(gw, BIG, n=FITS_ONCE, v="v2")
        p = reload_cli(gw)
        assert p.returncode == 1, (p.stdout, p.stderr)
        assert p.stdout == ""
        assert re.search(r"worker \d could not load generation 2: .*gateway\.lua", p.stderr), \
            p.stderr
        assert "not enough memory" in p.stderr, p.stderr
        # Each worker says which generation it could not load, and why.
        st = wait_for(lambda: (lambda st: all(w.get("failed_generation") == 2
                                              for w in st["workers"]) and st)(status(gw)),
                      timeout=3)
        assert st, status(gw)
        for w in st["workers"]:
            assert w["generation"] == 1, st
            assert "not enough memory" in w["error"], st
        r = post_reload(gw)
        assert r.status == 422 and r.json()["ok"] is False, r
        assert "gateway.lua" in r.json()["error"], r.body


def test_the_old_generation_keeps_serving_after_a_worker_could_not_load_the_new_one():
    with start(BIG, workers=1, n=FITS_ONCE, v="v1") as gw:
        write_config(gw, BIG, n=FITS_ONCE, v="v2")
        assert reload_cli(gw).returncode == 1
        got = [try_get(gw.port, "/v") for _ in range(3)]
        # Even a small config loads again afterwards.
        write_config(gw, BIG, n=10, v="v3")
        p = reload_cli(gw)
        assert got == [(200, b"v1")] * 3, got
        assert p.returncode == 0, p.stderr
        assert_serves_only(gw, "/v", b"v3", 3)


def test_a_worker_respawned_after_a_rejected_reload_serves_the_running_config():
    with start(V1) as gw:
        write_config(gw, V1 + 'route "GET /x" {\n')
        gw.signal(signal.SIGHUP)
        assert wait_for(lambda: status(gw)["reload_failures"] == 1, timeout=3)
        victim = gw.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        # The master respawns it; the new worker must serve generation 1 like the other.
        def respawned():
            try:
                st = status(gw, timeout=1)
            except (OSError, http.client.HTTPException):
                return None
            ws = st["workers"]
            return all(w["pid"] != victim and w["generation"] == 1 for w in ws) and st
        ok = wait_for(respawned, timeout=3)
        got = [try_get(gw.port, "/v", timeout=1) for _ in range(4)]
        assert ok, gw.stderr_text()[-1500:]
        assert got == [(200, b"v1")] * 4, got
        assert "cannot load" not in gw.stderr_text(), gw.stderr_text()[-1500:]


def test_workers_load_the_files_the_master_checked_not_what_is_on_disk_later():
    """A worker that takes its time to switch (here: stopped with SIGSTOP) still loads the
    generation the master checked, though the handler file was broken on disk since."""
    d = new_dir()
    handler = os.path.join(d, "v.lua")
    write_file(handler, 'return function(req) return 200, "v1" end\n')
    body = 'route "GET /v" { handler = "%s" }\n' % handler
    with start(body, workers=1) as gw:
        assert_serves_only(gw, "/v", b"v1", n=3)
        worker = gw.worker_pids()[0]
        os.kill(worker, signal.SIGSTOP)
        try:
            write_file(handler, 'return function(req) return 200, "v2" end\n')
            gw.signal(signal.SIGHUP)
            # (The admin API is served by the workers: ask the master's log.)
            assert wait_for(lambda: "generation 2 checked" in gw.stderr_text(), timeout=5)
            write_file(handler, 'return function(req) return 200, "v3" end end\n')   # broken
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_switched(gw, 2)
        assert_serves_only(gw, "/v", b"v2", n=3)
        assert "could not be loaded" not in gw.stderr_text(), gw.stderr_text()[-1500:]
        # The master writes that hand-over file for itself: it is not the scripts' business.
        files = os.path.join(gw.fmt["tmp"], "moongate.pid.files")
        assert os.stat(files).st_mode & 0o077 == 0, oct(os.stat(files).st_mode)
    assert not os.path.exists(files)


def reload_applies_or_says_restart(gw):
    """Runs `moongate reload`: True when it took the file, False when it refused it as a
    change that needs a restart (any other outcome fails)."""
    p = reload_cli(gw)
    if p.returncode == 0:
        return True
    assert p.returncode == 1 and "restart to apply" in p.stderr, (p.stdout, p.stderr)
    return False


LIMITS = ('limits { uri_bytes = {uri} }\n'
          'route "GET /*" { respond = { 200, "any" } }\n')


def test_a_limits_change_is_applied_or_refused_not_ignored():
    with start(LIMITS, workers=1, uri=8192) as gw:
        long_path = "/" + "a" * 500
        assert try_get(gw.port, long_path)[0] == 200
        write_config(gw, LIMITS, uri=100)
        if reload_applies_or_says_restart(gw):
            assert try_get(gw.port, long_path)[0] == 414
        else:
            assert try_get(gw.port, long_path)[0] == 200


def test_an_access_log_change_is_applied_or_refused_not_ignored():
    with start(V1, workers=1) as gw:
        assert request(gw.port, "GET", "/v").status == 200
        new_log = os.path.join(gw.tmp, "access2.log")
        write_config(gw, V1, head=HEAD.replace("{tmp}/access.log", new_log))
        if reload_applies_or_says_restart(gw):
            assert request(gw.port, "GET", "/old").status == 200
            assert wait_for(lambda: os.path.exists(new_log) and
                            "/old" in open(new_log).read(), timeout=2), \
                "the request was logged to the old file: %r" % open(
                    os.path.join(gw.tmp, "access.log")).read()[-300:]


def test_a_reload_signal_reaching_a_starting_worker_does_not_kill_it():
    # The master's own timing rarely lands in the window, so the test sends the worker the
    # signal the master would send, as soon as the worker exists (a few tries: it is a race).
    body = 'route "GET /v" { respond = { 200, "v1" } }\n'
    for attempt in range(15):
        gw = Gateway(body + 'listen { port = {port}, host = "127.0.0.1" }\n', workers=1,
                     wait=False)
        try:
            pids = wait_for(lambda: gw.worker_pids(), timeout=3, interval=0.0002)
            assert pids, gw.stderr_text()
            os.kill(pids[0], signal.SIGHUP)
            time.sleep(0.1)
            assert "killed by signal 1" not in gw.stderr_text(), (
                "attempt %d: %s" % (attempt, gw.stderr_text()[-600:]))
        finally:
            gw.stop(expect_clean=False)


# ---------------------------------------------------------------------------------------------
# 3. Reload under load: not one request fails
# ---------------------------------------------------------------------------------------------

# keepalive_requests high: a connection the gateway closes during the test is a finding.
AB = ('limits { keepalive_requests = 1000000 }\n'
      'route "GET /ab" { handler = function(req) return 200, "{v}" end }\n')


def test_reload_under_load_fails_no_request():
    """20 keep-alive clients for 5 s while the config is reloaded every 200 ms, alternating
    between two versions whose answers differ ("a", "b"); the acceptance test of reload."""
    with start(AB, workers=2, v="a") as gw:
        stop = threading.Event()
        lock = threading.Lock()
        results = []   # (sent, received, body) of every good response
        failures = []  # what went wrong

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
            mine = []
            try:
                while not stop.is_set():
                    t0 = time.monotonic()
                    try:
                        conn.request("GET", "/ab")
                        r = conn.getresponse()
                        body = r.read()
                    except (OSError, http.client.HTTPException) as e:
                        failures.append("connection error: %r" % e)
                        conn.close()
                        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
                        continue
                    t1 = time.monotonic()
                    if r.status != 200 or body not in (b"a", b"b"):
                        failures.append("answer %d %r" % (r.status, body[:200]))
                    elif r.getheader("connection", "").lower() == "close":
                        failures.append("the gateway closed a keep-alive connection")
                    mine.append((t0, t1, body))
            finally:
                conn.close()
                with lock:
                    results.extend(mine)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(20)]
        for t in threads:
            t.start()
        reloads = []  # (started, done, version)
        version = "a"
        # 5 s and at least 10 reloads (a slow machine, a sanitizer build: up to 20 s).
        t_start = time.monotonic()
        try:
            while (time.monotonic() < t_start + 5.0 or len(reloads) < 10) and \
                    time.monotonic() < t_start + 20.0:
                time.sleep(0.2)
                version = "b" if version == "a" else "a"
                write_config(gw, AB, v=version)
                t0 = time.monotonic()
                p = reload_cli(gw)
                t1 = time.monotonic()
                assert p.returncode == 0, (p.stdout, p.stderr)
                reloads.append((t0, t1, version.encode()))
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        assert not failures, "%d failures, first: %s" % (len(failures), failures[:5])
        assert len(reloads) >= 10, len(reloads)
        assert len(results) >= 20 * 10, (len(results), len(reloads))
        # After each reload the new answer is what a request sent later gets (until the next
        # reload starts).
        checked = 0
        for k, (_, done, v) in enumerate(reloads):
            next_start = reloads[k + 1][0] if k + 1 < len(reloads) else float("inf")
            window = [b for sent, recv, b in results if sent > done and recv < next_start]
            stale = [b for b in window if b != v]
            assert not stale, "reload %d (%r): %d of %d later answers were %r" % (
                k, v, len(stale), len(window), stale[:3])
            checked += len(window)
        assert checked >= len(results) // 3, (checked, len(results))
        assert {b for _, _, b in results} == {b"a", b"b"}
        st = status(gw)
        assert st["generation"] == 1 + len(reloads) and st["reload_failures"] == 0, st
        assert_serves_only(gw, "/ab", version.encode(), 10)
        assert "respawning" not in gw.stderr_text()
        assert gw.stop() == 0


# ---------------------------------------------------------------------------------------------
# 4. An in-flight request finishes on the generation it started on
# ---------------------------------------------------------------------------------------------

SLOW = ('shared "n" { size = "1m" }\n'
        'route "GET /slow" { handler = function(req)\n'
        '  mg.shared.n:incr("started", 1)\n'
        '  mg.sleep(1.5)\n'
        '  return 200, "slow-{v}"\n'
        'end }\n'
        'route "GET /started" { handler = function(req)\n'
        '  return 200, tostring(mg.shared.n:get("started") or 0)\n'
        'end }\n')


def test_in_flight_request_finishes_on_its_generation():
    with start(SLOW, workers=2, v="v1") as gw:
        c = Client(gw.port, timeout=5)
        try:
            c.send_request("GET", "/slow")
            assert wait_for(lambda: request(gw.port, "GET", "/started").body == b"1",
                            timeout=2), "the slow request never started"
            write_config(gw, SLOW, v="v2")
            p = reload_cli(gw)
            assert p.returncode == 0, (p.stdout, p.stderr)
            # The reload did not wait for the request in flight: no answer yet.
            assert c.read_some(timeout=0) == b"", c.buf
            # A new request, meanwhile, runs on the new generation.
            out = {}
            t = threading.Thread(target=lambda: out.update(r=try_get(gw.port, "/slow")),
                                 daemon=True)
            t.start()
            r = c.read_response(timeout=4)
            assert r is not None and (r.status, r.body) == (200, b"slow-v1"), r
            t.join(4)
            assert out.get("r") == (200, b"slow-v2"), out
            # The same keep-alive connection's next request runs on the new generation.
            r = c.request("GET", "/slow", timeout=4)
            assert (r.status, r.body) == (200, b"slow-v2"), r
        finally:
            c.close()
        assert gw.stop() == 0


def test_in_flight_proxied_request_finishes_across_a_reload():
    release = threading.Event()

    def handler(conn):
        while True:
            req = conn.read_request(timeout=10)
            if req is None:
                return
            if req.target == "/p/slow":
                release.wait(5)
            conn.respond(200, ("up:" + req.target).encode())

    pool = ('upstream "u" { "127.0.0.1:{up}" }\n'
            'route "GET /p/*" { upstream = "u" }\n'
            'route "GET /v" { respond = { 200, "{v}" } }\n')
    with Upstream(handler) as up, start(pool, workers=1, up=up.port, v="v1") as gw:
        out = {}
        t = threading.Thread(target=lambda: out.update(r=try_get(gw.port, "/p/slow", 8)),
                             daemon=True)
        t.start()
        assert up.wait_requests(1, timeout=3), "the slow request never reached the upstream"
        write_config(gw, pool, v="v2")
        assert reload_cli(gw).returncode == 0
        assert_serves_only(gw, "/v", b"v2", 2)
        release.set()
        t.join(5)
        assert out.get("r") == (200, b"up:/p/slow"), out
        # The old generation is gone now; the route still proxies.
        for _ in range(3):
            assert try_get(gw.port, "/p/after") == (200, b"up:/p/after")
        assert gw.stop() == 0


# ---------------------------------------------------------------------------------------------
# 5. A hundred reloads: the workers do not grow
# ---------------------------------------------------------------------------------------------

def many_routes(v):
    lines = ['shared "n" { size = "1m" }\n',
             'local data = {}\n',
             'for i = 1, 2000 do data[i] = { id = i, name = "item-" .. i .. "-{v}" } end\n',
             'route "GET /v" { handler = function(req) return 200, data[7].name end }\n']
    for i in range(60):
        lines.append('route "GET /r%d/:id" { handler = function(req) '
                     'return 200, { route = %d, id = req.params.id, v = "{v}" } end }\n' % (i, i))
    return "".join(lines).replace("{v}", v)


def sanitized():
    """True when the binary under test is a sanitizer build (make asan)."""
    return os.environ.get("MG_SANITIZED") == "1" or "asan" in mgtest.moongate_bin()


def test_a_hundred_reloads_do_not_grow_the_workers():
    bodies_by_version = {"a": b"item-7-a", "b": b"item-7-b"}
    with start(many_routes("a"), workers=2) as gw:
        configs = {v: substitute(HEAD + many_routes(v), gw.fmt) for v in "ab"}
        rss = {}
        for n in range(1, 101):
            v = "b" if n % 2 else "a"
            write_file(gw.config_path, configs[v])
            gw.signal(signal.SIGHUP)
            wait_switched(gw, 1 + n)
            # Both workers answer with the new version (fresh connections: either worker).
            for _ in range(2):
                assert try_get(gw.port, "/v") == (200, bodies_by_version[v])
            r = request(gw.port, "GET", "/r%d/x%d" % (n % 60, n))
            assert r.status == 200 and r.json() == {"route": n % 60, "id": "x%d" % n, "v": v}
            if n in (10, 100):
                rss[n] = worker_rss(gw)
        st = status(gw)
        assert st["reloads"] == 100 and st["reload_failures"] == 0, st
        # The first reloads warm up (allocator pools, Lua's heap reaching its working size):
        # compare the workers after reload 10 with the workers after reload 100. Under ASan
        # the quarantine keeps freed memory resident, so RSS says nothing there.
        if not sanitized():
            growth = (rss[100] - rss[10]) / float(rss[10])
            assert growth <= 0.10, "workers' RSS %d KiB after 10 reloads, %d KiB after 100" % (
                rss[10], rss[100])
        assert gw.stop() == 0


# ---------------------------------------------------------------------------------------------
# 6. Upstream keep-alive connections survive a reload
# ---------------------------------------------------------------------------------------------

POOL = ('upstream "u" { "127.0.0.1:{up}" }\n'
        'route "GET /p" { upstream = "u" }\n'
        'route "GET /v" { respond = { 200, "{v}" } }\n')


def test_upstream_keepalive_connection_is_reused_after_reload():
    with Upstream() as up, start(POOL, workers=1, up=up.port, v="v1") as gw:
        for _ in range(3):
            assert try_get(gw.port, "/p") == (200, b"ok")
        assert up.connections == 1, up.connections
        write_config(gw, POOL, v="v2")
        p = reload_cli(gw)
        assert p.returncode == 0, p.stderr
        assert_serves_only(gw, "/v", b"v2", 2)
        for _ in range(3):
            assert try_get(gw.port, "/p") == (200, b"ok")
        assert len(up.wait_requests(6, timeout=2)) == 6
        # The same connection carried all six: the pool moved to the new generation.
        assert up.connections == 1, up.connections
        assert [r.target for r in up.requests] == ["/p"] * 6
        assert gw.stop() == 0


def test_idle_upstream_connection_is_closed_when_the_reload_drops_its_upstream():
    with Upstream() as up, Upstream.fixed(body=b"other") as up2, \
            start(POOL, workers=1, up=up.port, v="v1") as gw:
        assert try_get(gw.port, "/p") == (200, b"ok")
        assert up.wait_connections(1) == 1
        write_config(gw, POOL, up=up2.port, v="v2")
        assert reload_cli(gw).returncode == 0
        # The old pool's idle connection is closed; the route now goes to the new address.
        assert wait_for(lambda: up.conns[0].eof, timeout=3), "old idle connection left open"
        assert try_get(gw.port, "/p") == (200, b"other")
        assert up2.connections == 1 and up.connections == 1
        assert gw.stop() == 0


def test_a_reload_that_lowers_upstream_keepalive_trims_the_idle_connections():
    pool = POOL.replace('"127.0.0.1:{up}"', '"127.0.0.1:{up}", keepalive = {ka}')
    with Upstream() as up, start(pool, workers=1, up=up.port, ka=32, v="v1") as gw:
        assert try_get(gw.port, "/p") == (200, b"ok")
        assert up.wait_connections(1) == 1
        write_config(gw, pool, ka=0, v="v2")
        assert reload_cli(gw).returncode == 0
        # keepalive = 0: the new generation keeps no idle connection.
        assert wait_for(lambda: up.conns[0].eof, timeout=2), "the idle connection stayed open"


# ---------------------------------------------------------------------------------------------
# 7. Shared dictionaries survive a reload
# ---------------------------------------------------------------------------------------------

COUNT = ('shared "n" { size = "1m" }\n'
         'route "GET /n" { handler = function(req)\n'
         '  return 200, "{v}:" .. tostring(mg.shared.n:incr("k", 1))\n'
         'end }\n'
         'route "GET /set" { handler = function(req)\n'
         '  mg.shared.n:set("s", "kept") return 200, "ok"\n'
         'end }\n'
         'route "GET /get" { handler = function(req)\n'
         '  return 200, tostring(mg.shared.n:get("s"))\n'
         'end }\n')


def test_shared_dict_counts_on_across_reloads():
    with start(COUNT, workers=2, v="v1") as gw:
        got = [request(gw.port, "GET", "/n").body for _ in range(3)]
        assert got == [b"v1:1", b"v1:2", b"v1:3"], got
        assert request(gw.port, "GET", "/set").status == 200
        write_config(gw, COUNT, v="v2")
        assert reload_cli(gw).returncode == 0
        got = [request(gw.port, "GET", "/n").body for _ in range(3)]
        assert got == [b"v2:4", b"v2:5", b"v2:6"], got
        gw.signal(signal.SIGHUP)
        wait_switched(gw, 3)
        assert request(gw.port, "GET", "/n").body == b"v2:7"
        assert_serves_only(gw, "/get", b"kept", 4)
        assert gw.stop() == 0
