"""Lua hooks in script files, `moongate check` on hooks, mg.shared across workers, and the
errors of mg API functions called where they are not allowed. Against the real binary."""

import threading
import time

import pytest

from hookkit import (config_line, SHARED_READER, assert_same_worker, assert_script_error,
                     get, hook_gateway, log_entry, one_worker, shared_value, wait_log)
from mgtest import Client, run_cli, wait_for

# ---------------------------------------------------------------------------------------------
# Functions in files
# ---------------------------------------------------------------------------------------------

FILES = {
    "functions/hello.lua": (
        "-- a handler in a file of its own\n"
        "return function(req)\n"
        "  return 200, { hello = req.params.name, route = req.route }\n"
        "end\n"),
    "functions/counter.lua": (
        "local n = 0                       -- one copy per worker, shared by every route\n"
        "return function(req)\n"
        "  n = n + 1\n"
        "  return 200, { n = n }\n"
        "end\n"),
    "functions/guard.lua": (
        "return function(req)\n"
        "  if req:header(\"X-Key\") ~= \"k\" then return 401, { error = \"key\" } end\n"
        "end\n"),
    "functions/boom.lua": (
        "return function(req)\n"
        "  local t = nil\n"
        "  return 200, t.x\n"
        "end\n"),
    "functions/globals.lua": (
        "return function(req)\n"
        "  return 200, { s = tostring(12) .. string.upper(\"x\"), json = mg.json.encode({ 1 }),\n"
        "                n = select(\"#\", 1, 2), p = type(pairs) }\n"
        "end\n"),
}

FILE_ROUTES = r'''
route "GET /hello/:name" { handler = "functions/hello.lua" }
route "/c1" { handler = "functions/counter.lua" }
route "/c2" { handler = "functions/counter.lua" }
route "/guarded" { access = { "functions/guard.lua" }, handler = "functions/hello.lua" }
route "/boom" { handler = "functions/boom.lua" }
route "/globals" { handler = "functions/globals.lua" }
'''


def test_a_handler_file_relative_to_the_config_dir():
    g = hook_gateway(FILE_ROUTES, files=FILES, workers=1)
    r = get(g, "/hello/ada")
    assert r.status == 200 and r.json() == {"hello": "ada", "route": "GET /hello/:name"}, r
    # A file named twice is loaded once: both routes share its upvalue.
    assert [get(g, p).json()["n"] for p in ("/c1", "/c2", "/c1")] == [1, 2, 3]


def test_an_access_hook_file_in_a_list():
    g = hook_gateway(FILE_ROUTES, files=FILES)
    assert get(g, "/guarded").status == 401
    r = get(g, "/guarded", headers={"X-Key": "k"})
    assert r.status == 200 and r.json()["route"] == "/guarded", r


def test_an_error_in_a_file_names_the_file_and_line():
    g = hook_gateway(FILE_ROUTES, files=FILES)
    rid = assert_script_error(get(g, "/boom"))
    entry = log_entry(g, rid)
    assert ("handler hook failed: functions/boom.lua:3: attempt to index local 't' "
            "(a nil value)") in entry, entry
    assert "stack traceback:" in entry


def test_a_handler_file_sees_the_sandbox_globals():
    g = hook_gateway(FILE_ROUTES, files=FILES)
    r = get(g, "/globals")
    assert r.status == 200, (r, g.stderr_text()[-2000:])
    assert r.json() == {"s": "12X", "json": "[1]", "n": 2, "p": "function"}


def check(tmp_path, config, files=None):
    """Runs `moongate check` on CONFIG (with FILES next to it); returns (rc, output, path)."""
    for rel, text in (files or {}).items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    path = tmp_path / "gateway.lua"
    path.write_text('listen { port = 18080, host = "127.0.0.1" }\n' + config)
    cp = run_cli(["check", "-c", str(path)], timeout=10)
    return cp.returncode, cp.stdout + cp.stderr, str(path)


def test_check_accepts_handler_files(tmp_path):
    rc, out, path = check(tmp_path, FILE_ROUTES, FILES)
    assert rc == 0 and "ok" in out, out


@pytest.mark.parametrize("case", ["not-a-function", "syntax", "missing", "raises", "list"])
def test_check_reports_a_bad_handler_file_with_file_and_line(tmp_path, case):
    files = {
        "functions/notfn.lua": "local t = {}\nreturn t\n",
        "functions/syntax.lua": "return function(req)\n  local x = \n  return 200\nend\n",
        "functions/raises.lua": "local cfg = nil\nlocal v = cfg.value\nreturn function() end\n",
        "functions/list.lua": "return 42\n",
    }
    route, expect = {
        "not-a-function": ('route "/x" { handler = "functions/notfn.lua" }',
                           'route "/x": handler script "functions/notfn.lua" must return a '
                           'function, got a table'),
        "syntax": ('route "/x" { handler = "functions/syntax.lua" }',
                   'route "/x": handler script functions/syntax.lua:3:'),
        "missing": ('route "/x" { handler = "functions/nowhere.lua" }',
                    'route "/x": handler script "functions/nowhere.lua"'),
        "raises": ('route "/x" { handler = "functions/raises.lua" }',
                   'route "/x": handler script "functions/raises.lua" failed while loading: '
                   'functions/raises.lua:2: attempt to index local \'cfg\' (a nil value)'),
        "list": ('route "/x" { respond = { 200, "x" }, access = { function() end, '
                 '"functions/list.lua" } }',
                 'route "/x": access script "functions/list.lua" must return a function, '
                 'got 42'),
    }[case]
    rc, out, path = check(tmp_path, "\n" + route + "\n", files)
    assert rc != 0, out
    # The config's file:line (the route is on line 3), then what is wrong with the script.
    assert "%s:3: %s" % (path, expect) in out, out


def test_a_gateway_with_a_bad_handler_file_does_not_start(tmp_path):
    (tmp_path / "notfn.lua").write_text("return 'nope'\n")
    path = tmp_path / "gateway.lua"
    path.write_text('listen { port = 18081, host = "127.0.0.1" }\n'
                    'route "/x" { handler = "notfn.lua" }\n')
    cp = run_cli(["-c", str(path), "-w", "1"], timeout=10)
    assert cp.returncode == 1, cp
    assert '%s:2: route "/x": handler script "notfn.lua" must return a function' % path in \
        cp.stderr, cp.stderr


# ---------------------------------------------------------------------------------------------
# mg.shared: exact across workers, TTLs
# ---------------------------------------------------------------------------------------------

COUNTER = r'''
shared "d" { size = "1m" }
route "/incr" { handler = function(req) return 200, tostring(mg.shared.d:incr("hits")) end }
''' + SHARED_READER


def test_shared_incr_is_exact_across_two_workers():
    g = hook_gateway(COUNTER, workers=2)
    assert len(wait_for(lambda: len(g.worker_pids()) == 2 and g.worker_pids(), timeout=3)) == 2
    seen, errors = [], []
    lock = threading.Lock()

    def client():
        got = []
        try:
            with Client(g.port, timeout=10) as c:
                for _ in range(100):
                    r = c.request("GET", "/incr", timeout=10)
                    if r is None or r.status != 200:
                        errors.append(r)
                        return
                    got.append(int(r.body))
        except OSError as e:
            errors.append(e)
        with lock:
            seen.extend(got)

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    # Every increment returned a distinct value, and the total is exact.
    assert sorted(seen) == list(range(1, 2001))
    assert shared_value(g, "hits") == 2000


def test_shared_ttl_expires():
    g = hook_gateway(r'''
shared "d" { size = "1m" }
route "/set" {
  handler = function(req)
    local d = mg.shared.d
    local ok = d:set("short", "v", 0.3)
    local added, aerr = d:add("short", "other")
    local n = d:incr("counter", 5, 10, 0.3)
    return 200, { ok = ok, added = added == nil, aerr = aerr, n = n, ttl = d:ttl("short"),
                  forever = d:set("long", "x") and d:ttl("long") }
  end,
}
route "/ttl" {
  handler = function(req) return 200, { ttl = mg.shared.d:ttl(req.args.k) or mg.json.null } end,
}
''' + SHARED_READER)
    doc = get(g, "/set").json()
    assert doc["ok"] is True and doc["added"] is True and doc["aerr"] == "exists", doc
    assert doc["n"] == 15 and doc["forever"] == 0, doc
    assert 0 < doc["ttl"] <= 0.3, doc
    assert shared_value(g, "short") == "v" and shared_value(g, "counter") == 15
    time.sleep(0.45)
    assert shared_value(g, "short") is None and shared_value(g, "counter") is None
    assert get(g, "/ttl?k=short").json() == {"ttl": None}
    assert shared_value(g, "long") == "x"


# ---------------------------------------------------------------------------------------------
# mg functions where they are not allowed
# ---------------------------------------------------------------------------------------------

MISUSE = r'''
shared "d" { size = "1m" }
route "/m/set-header-handler" { handler = function(req) req:set_header("X-A", "1") return 200, "x" end }
route "/m/set-header-response" {
  handler = function(req) return 200, "x" end,
  response = function(req, res) req:set_header("X-A", "1") end,
}
route "/m/set-path-access" { access = function(req) req:set_path("/x") end, handler = function() return 200, "x" end }
route "/m/set-path-handler" { handler = function(req) req:set_path("/x") return 200, "x" end }
route "/m/body-response" {
  handler = function(req) return 200, "x" end,
  response = function(req, res) req:body() end,
}
route "/m/sleep-sort" {
  handler = function(req)
    local t = { 3, 1, 2 }
    table.sort(t, function(a, b) mg.sleep(0) return a < b end)
    return 200, "x"
  end,
}
route "/m/sleep-negative" { handler = function(req) mg.sleep(-1) return 200, "x" end }
route "/m/no-dict" { handler = function(req) mg.shared.nope:get("k") return 200, "x" end }
route "/m/dot-call" { handler = function(req) mg.shared.d.get("k") return 200, "x" end }
route "/m/assign-shared" { handler = function(req) mg.shared.e = 1 return 200, "x" end }
route "/m/log-level" { handler = function(req) mg.log("loud", "x") return 200, "x" end }
route "/m/collect" { handler = function(req) collectgarbage("collect") return 200, "x" end }
route "/m/req-method-call" { handler = function(req) req.header("X-A") return 200, "x" end }
'''

MISUSES = {
    "/m/set-header-handler": "handler hook failed: %s: req:set_header cannot be called in the "
                             "handler hook",
    "/m/set-header-response": "response hook failed: %s: req:set_header cannot be called in "
                              "the response hook",
    "/m/set-path-access": "access hook failed: %s: req:set_path cannot be called in the access "
                          "hook",
    "/m/set-path-handler": "handler hook failed: %s: req:set_path cannot be called in the "
                           "handler hook",
    "/m/body-response": "response hook failed: %s: req:body cannot be called in the response "
                        "hook",
    "/m/sleep-sort": "handler hook failed: %s: mg.sleep cannot wait here",
    "/m/sleep-negative": "handler hook failed: %s: bad argument #1 to 'sleep' (seconds must be "
                         "from 0 to 1e9",
    "/m/no-dict": 'handler hook failed: %s: no shared dictionary "nope"',
    "/m/dot-call": "handler hook failed: %s: bad argument #1 to 'get' (not a shared "
                   "dictionary: call it with a colon",
    "/m/assign-shared": "handler hook failed: %s: mg.shared is read-only",
    "/m/log-level": "handler hook failed: %s: bad argument #1 to 'log' (level must be",
    "/m/collect": "handler hook failed: %s: collectgarbage(\"collect\") is not available in the "
                  "sandbox",
    "/m/req-method-call": "handler hook failed: %s: expected a request object (call it as "
                          "req:method(...))",
}


@pytest.mark.parametrize("path", sorted(MISUSES))
def test_an_mg_function_where_it_is_not_allowed_raises_a_clear_error(path):
    g = hook_gateway(MISUSE, workers=1)
    pid = one_worker(g)
    rid = assert_script_error(get(g, path))
    entry = log_entry(g, rid)
    marker = 'route "%s"' % path
    line = [i for i, text in enumerate(g.config.split("\n"), 1) if marker in text][0]
    # The failing call is on the route's line or (multi-line routes) a line or two below.
    wheres = ["%s:%d" % (g.config_path, n) for n in (line, line + 1, line + 2, line + 3)]
    assert any(MISUSES[path] % w in entry for w in wheres), entry
    assert_same_worker(g, pid)


def test_req_set_header_from_a_timer_after_the_request_raises():
    g = hook_gateway(r'''
route "/later" {
  handler = function(req)
    mg.timer(0.01, function()
      local ok, err = pcall(req.set_header, req, "X-A", "1")
      mg.log("warn", "timer:", ok, err)
    end)
    return 200, "x"
  end,
}
''')
    assert get(g, "/later").status == 200
    text = wait_log(g, "timer: false")
    assert "req:set_header cannot be called in the timer hook" in text, text[-2000:]


def test_a_body_filter_that_waits_is_an_error(upstream):
    g = hook_gateway(r'''
route "/f" {
  upstream = "u",
  response = function(req, res)
    res:filter(function(chunk, eof) mg.sleep(0.01) return chunk end)
  end,
}
''', up=upstream, workers=1)
    pid = one_worker(g)
    r = get(g, "/f")
    rid = assert_script_error(r)
    assert "body filter hook failed: a body filter cannot wait for I/O" in log_entry(g, rid)
    assert_same_worker(g, pid)


def test_req_set_header_in_a_log_hook_is_a_logged_error_naming_the_hook(upstream):
    g = hook_gateway(r'''
route "/l" { upstream = "u", log = function(req, res) req:set_header("X-A", "1") end }
''', up=upstream, workers=1)
    pid = one_worker(g)
    r = get(g, "/l")
    assert r.status == 200, r
    entry = log_entry(g, r.header("x-request-id"))
    assert "log hook failed: %s:%d: req:set_header cannot be called in the log hook" % (
        g.config_path, config_line(g, 'route "/l"')) in entry, entry
    assert_same_worker(g, pid)


@pytest.mark.parametrize("call,name", [("mg.sleep(0.1)", "mg.sleep"),
                                       ("mg.timer(1, function() end)", "mg.timer")])
def test_waiting_at_config_load_fails_check_with_file_and_line(tmp_path, call, name):
    rc, out, path = check(tmp_path, "local x = 1\n%s\n" % call)
    assert rc != 0, out
    assert "%s:3:" % path in out, out
    assert "%s can only be called from a hook or a timer, not while the config loads" % name \
        in out, out


def test_mg_now_and_log_work_at_config_load(tmp_path):
    rc, out, path = check(tmp_path, 'local t = mg.now()\n'
                                    'mg.log("info", "loading at", t)\n'
                                    'assert(type(t) == "number" and t > 1.5e9)\n')
    assert rc == 0, out
