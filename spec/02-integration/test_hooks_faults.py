"""Faults in Lua hooks, against the real binary: a script that raises in any hook, header
injection from Lua, runaway loops (also after the code was hot), unbounded allocation, the
sandbox, and globals.

What a user must see each time: a JSON 500 "script error" carrying the request id (never a
split or half-written response), an error-log entry with file:line and a traceback, and the
same worker process serving the next request."""

import threading
import time

import pytest

from hookkit import (assert_same_worker, assert_script_error, config_line, get,
                     hook_gateway, log_entry, one_worker, raw_get, timed, wait_log)
from mgtest import Client, Upstream, parse_responses, raw

# ---------------------------------------------------------------------------------------------
# An error in each hook
# ---------------------------------------------------------------------------------------------

FAILING = r'''
hooks {
  request = function(req)
    if req.path == "/fail/request" then error("boom-request") end
  end,
}
route "/fail/request" { upstream = "u" }
route "/fail/access" {
  upstream = "u",
  access = function(req) local t = nil; return t.field end,  -- boom-access
}
route "/fail/handler" {
  handler = function(req)
    mg.sleep(0.01)
    error("boom-handler")
  end,
}
route "/fail/response" {
  upstream = "u",
  response = function(req, res) error("boom-response") end,
}
route "/fail/filter" {
  upstream = "u",
  response = function(req, res) res:filter(function(chunk, eof) error("boom-filter") end) end,
}
route "/fail/log" { upstream = "u", log = function(req, res) error("boom-log") end }
route "/ok" { upstream = "u" }
'''

# hook -> (what the log names, the config marker of the failing line, the message)
FAILURES = {
    "request": ("request hook failed", 'error("boom-request")', "boom-request"),
    "access": ("access hook failed", "boom-access",
               "attempt to index local 't' (a nil value)"),
    "handler": ("handler hook failed", 'error("boom-handler")', "boom-handler"),
    "response": ("response hook failed", 'error("boom-response")', "boom-response"),
    "filter": ("body filter hook failed", 'error("boom-filter")', "boom-filter"),
}


@pytest.mark.parametrize("hook", sorted(FAILURES))
def test_an_error_in_a_hook_is_a_json_500_with_file_line_and_traceback(upstream, hook):
    g = hook_gateway(FAILING, up=upstream, workers=1)
    pid = one_worker(g)
    data, rs = raw_get(g.port, "/fail/" + hook)
    assert len(rs) == 1, data
    rid = assert_script_error(rs[0])
    what, marker, msg = FAILURES[hook]
    entry = log_entry(g, rid)
    where = "%s:%d:" % (g.config_path, config_line(g, marker))
    assert "request %s: %s: %s %s" % (rid, what, where, msg) in entry, entry
    assert "stack traceback:" in entry, entry
    # The worker goes on: same process, next request proxied.
    r = get(g, "/ok")
    assert r.status == 200 and r.body == b"ok", r
    assert_same_worker(g, pid)


def test_an_error_in_a_log_hook_is_logged_only(upstream):
    g = hook_gateway(FAILING, up=upstream, workers=1)
    pid = one_worker(g)
    r = get(g, "/fail/log")
    assert r.status == 200 and r.body == b"ok", r
    rid = r.header("x-request-id")
    entry = log_entry(g, rid)
    where = "%s:%d:" % (g.config_path, config_line(g, 'error("boom-log")'))
    assert "request %s: log hook failed: %s boom-log" % (rid, where) in entry, entry
    assert "stack traceback:" in entry, entry
    assert get(g, "/ok").status == 200
    assert_same_worker(g, pid)


BAD_ANSWERS = r'''
route "/bad/nothing" { handler = function(req) end }
route "/bad/status-low" { handler = function(req) return 99, "x" end }
route "/bad/status-string" { handler = function(req) return "200", "x" end }
route "/bad/body-function" { handler = function(req) return 200, function() end end }
route "/bad/json" { handler = function(req) return 200, { f = function() end } end }
route "/bad/error-table" { handler = function(req) error({ code = 1 }) end }
route "/bad/yield" { handler = function(req) coroutine.yield() end }
'''


@pytest.mark.parametrize("path,message", [
    ("/bad/nothing", "handler hook failed: the handler returned no status (return status, body)"),
    ("/bad/status-low", "the status must be an integer from 200 to 599, got 99"),
    ("/bad/status-string", "the status must be an integer from 200 to 599, got string"),
    ("/bad/body-function", "the body must be a string or a table, got a function value"),
    ("/bad/json", "handler hook failed: bad answer: cannot encode function"),
    ("/bad/error-table", "handler hook failed: (error object is a table value)"),
    ("/bad/yield", "handler hook failed: coroutine.yield called outside a coroutine"),
])
def test_a_bad_answer_from_a_handler_is_a_json_500(path, message):
    g = hook_gateway(BAD_ANSWERS)
    data, rs = raw_get(g.port, path)
    assert len(rs) == 1, data
    rid = assert_script_error(rs[0])
    assert message in log_entry(g, rid)


# ---------------------------------------------------------------------------------------------
# Header injection from Lua never reaches the wire
# ---------------------------------------------------------------------------------------------

INJECT = r'''
route "/inj/value" { handler = function() return 200, "x", { ["X-Evil"] = "a\r\nInjected: 1" } end }
route "/inj/lf" { handler = function() return 200, "x", { ["X-Evil"] = "a\nInjected: 1" } end }
route "/inj/nul" { handler = function() return 200, "x", { ["X-Evil"] = "a\0Injected: 1" } end }
route "/inj/list" { handler = function() return 200, "x", { ["X-Evil"] = { "ok", "b\r\nInjected: 1" } } end }
route "/inj/name-space" { handler = function() return 200, "x", { ["Bad Name"] = "v" } end }
route "/inj/name-colon" { handler = function() return 200, "x", { ["X-A:Injected"] = "1" } end }
route "/inj/name-crlf" { handler = function() return 200, "x", { ["X-A\r\nInjected"] = "1" } end }
route "/inj/name-empty" { handler = function() return 200, "x", { [""] = "v" } end }
route "/inj/content-type" { handler = function() return 200, "x", { ["Content-Type"] = "text/plain\r\nInjected: 1" } end }
route "/inj/set-header" { upstream = "u", response = function(req, res) res:set_header("X-Evil", "a\r\nInjected: 1") end }
route "/inj/set-header-name" { upstream = "u", response = function(req, res) res:set_header("X-A\nInjected", "1") end }
route "/inj/response-return" { upstream = "u", response = function(req, res) return 200, "x", { ["X-A"] = "1\r\nInjected: 1" } end }
route "/inj/set-header-handler" {
  handler = function() return 200, "x" end,
  response = function(req, res) res:set_header("X-Evil", "a\r\nInjected: 1") end,
}
route "/inj/req-value" { upstream = "u", access = function(req) req:set_header("X-Evil", "a\nInjected: 1") end }
route "/inj/req-name" { upstream = "u", access = function(req) req:set_header("X-A\r\nInjected", "1") end }
route "/inj/req-path" { upstream = "u" }
route "/ok" { handler = function() return 200, "ok" end }
hooks {
  request = function(req)
    if req.path == "/inj/req-path" then req:set_path("/x\r\nInjected: 1") end
  end,
}
'''

INJECTIONS = {
    "/inj/value": "bad answer: the value of header X-Evil contains CR, LF or NUL",
    "/inj/lf": "bad answer: the value of header X-Evil contains CR, LF or NUL",
    "/inj/nul": "bad answer: the value of header X-Evil contains CR, LF or NUL",
    "/inj/list": "bad answer: the value of header X-Evil contains CR, LF or NUL",
    "/inj/name-space": 'bad answer: invalid header name "Bad Name"',
    "/inj/name-colon": 'bad answer: invalid header name "X-A:Injected"',
    "/inj/name-crlf": "bad answer: invalid header name",
    "/inj/name-empty": 'bad answer: invalid header name ""',
    "/inj/content-type": "bad answer: the value of header Content-Type is invalid",
    "/inj/set-header": "res:set_header: the value of X-Evil contains CR, LF or NUL",
    "/inj/set-header-name": "res:set_header: invalid header name",
    "/inj/response-return": "response hook failed: the value of header X-A contains CR, LF or NUL",
    "/inj/set-header-handler": "res:set_header: the value of X-Evil contains CR, LF or NUL",
    "/inj/req-value": "req:set_header: the value of X-Evil contains CR, LF or NUL",
    "/inj/req-name": "req:set_header: invalid header name",
    "/inj/req-path": "req:set_path: the path holds a space, a control character or #",
}


def assert_no_injection(data):
    """The bytes hold one response whose head has no line a script tried to inject."""
    rs = parse_responses(data)
    assert len(rs) == 1 and rs[0].complete, data
    head = data[:data.index(b"\r\n\r\n")]
    assert b"Injected" not in head, data
    assert b"\n" not in head.replace(b"\r\n", b""), data
    assert b"\0" not in head, data
    return rs[0]


@pytest.mark.parametrize("path", sorted(INJECTIONS))
def test_header_injection_from_lua_is_a_500_and_never_reaches_the_wire(echo_upstream, path):
    g = hook_gateway(INJECT, up=echo_upstream, workers=1)
    pid = one_worker(g)
    data = raw(g.port, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n\r\n", timeout=3,
               read_until_close=False)
    r = assert_no_injection(data)
    rid = assert_script_error(r)
    assert INJECTIONS[path] in log_entry(g, rid)
    if path.startswith("/inj/req-"):
        # A request-side edit that failed never reaches the upstream.
        assert echo_upstream.connections == 0
    assert get(g, "/ok").status == 200                      # still serving, same worker
    assert_same_worker(g, pid)


def test_header_injection_through_res_headers_or_res_status_keeps_the_upstream_head(
        echo_upstream):
    """Assigning res.headers or res.status directly is checked when the head is written: the
    bad values are dropped (logged), the upstream's own head goes out."""
    g = hook_gateway(r'''
route "/direct/header" {
  upstream = "u",
  response = function(req, res) res.headers["x-evil"] = "a\r\nInjected: 1" end,
}
route "/direct/name" {
  upstream = "u",
  response = function(req, res) res.headers["x-a\r\ninjected"] = "1" end,
}
route "/direct/status" {
  upstream = "u",
  response = function(req, res) res.status = "200\r\nInjected: 1" end,
}
''', up=echo_upstream)
    for path, message in (
            ("/direct/header", "response hook: the value of header x-evil contains CR, LF or "
                               "NUL; the upstream's headers are sent"),
            ("/direct/name", "response hook: invalid header name"),
            ("/direct/status", "response hook set an invalid res.status; keeping 200")):
        data, rs = raw_get(g.port, path)
        r = assert_no_injection(data)
        assert r.status == 200 and r.json()["target"] == path, r
        assert r.header("content-type") == "application/json"
        assert message in log_entry(g, r.header("x-request-id"))


# ---------------------------------------------------------------------------------------------
# Runaway scripts: the CPU budget
# ---------------------------------------------------------------------------------------------

RUNAWAY = r'''
lua { budget = 0.2 }
local function spin(n)
  local x, i = 0, 0
  while n < 0 or i < n do
    i = i + 1
    x = x + i % 7
  end
  return x
end
route "/loop" { handler = function(req) while true do end end }
route "/spin" {
  handler = function(req)
    local n, reps, s = tonumber(req.args.n), tonumber(req.args.reps) or 1, 0
    for _ = 1, reps do s = s + spin(n) end
    return 200, tostring(s)
  end,
}
route "/pcall-loop" {
  handler = function(req)
    local ok, err = pcall(function() while true do end end)  -- catching it does not help
    return 200, "swallowed: " .. tostring(err)
  end,
}
route "/filter-loop" {
  upstream = "u",
  response = function(req, res) res:filter(function(chunk) while true do end end) end,
}
route "/access-loop" { upstream = "u", access = function(req) while true do end end }
route "/response-loop" { upstream = "u", response = function(req, res) while true do end end }
route "/ok" { handler = function(req) return 200, "ok" end }
'''


def run_beside(g, path, other="/ok"):
    """Sends PATH on one connection and, 50 ms later, OTHER on another. Returns
    ((response, seconds) for each)."""
    out = {}

    def fetch(key, p, delay):
        time.sleep(delay)
        with Client(g.port, timeout=6) as c:
            out[key] = timed(lambda: c.request("GET", p, timeout=6))

    ts = [threading.Thread(target=fetch, args=("runaway", path, 0)),
          threading.Thread(target=fetch, args=("other", other, 0.05))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(8)
    return out["runaway"], out["other"]


@pytest.mark.parametrize("path,hook", [("/loop", "handler"), ("/access-loop", "access"),
                                       ("/response-loop", "response"),
                                       ("/pcall-loop", "handler"),
                                       ("/filter-loop", "body filter")])
def test_an_endless_loop_is_cut_by_the_budget_and_others_are_served(upstream, path, hook):
    g = hook_gateway(RUNAWAY, up=upstream, workers=1)
    pid = one_worker(g)
    (r, took), (other, other_took) = run_beside(g, path)
    assert r is not None, "no answer to the endless loop"
    rid = assert_script_error(r)
    assert took < 3, "the loop was cut after %.2f s (budget 0.2 s)" % took
    assert other is not None and other.status == 200 and other.body == b"ok", other
    assert other_took < 3, other_took
    entry = log_entry(g, rid)
    assert "%s hook failed" % hook in entry and "CPU budget" in entry, entry
    assert get(g, "/ok").status == 200
    assert_same_worker(g, pid)


def test_a_hot_function_that_then_loops_forever_is_cut(upstream):
    g = hook_gateway(RUNAWAY, up=upstream, workers=1)
    pid = one_worker(g)
    # 3 x 10,000 calls of spin: hot enough for a JIT to compile it, were one running.
    for _ in range(3):
        r = get(g, "/spin?n=20&reps=10000")
        assert r.status == 200 and r.body == b"630000", r
    (r, took), (other, _) = run_beside(g, "/spin?n=-1")
    assert r is not None, "no answer to the endless loop"
    rid = assert_script_error(r)
    assert took < 3, "the hot loop was cut after %.2f s (budget 0.2 s)" % took
    assert other is not None and other.status == 200, other
    assert "CPU budget" in log_entry(g, rid)
    assert get(g, "/spin?n=20&reps=10").body == b"630"
    assert_same_worker(g, pid)


def test_the_budget_is_per_resume_so_a_hook_may_sleep_between_bursts():
    """0.6 s of busy work in a handler with a 0.4 s budget, split by mg.sleep(0) into bursts of
    0.1 s (wall clock, like the budget), is not cut."""
    g = hook_gateway(r'''
lua { budget = 0.4 }
route "/bursts" {
  handler = function(req)
    for _ = 1, 6 do
      local t0 = mg.now()
      while mg.now() - t0 < 0.1 do end
      mg.sleep(0)
    end
    return 200, "done"
  end,
}
''', workers=1)
    r = get(g, "/bursts")
    assert r.status == 200 and r.body == b"done", (r, g.stderr_text()[-2000:])


# ---------------------------------------------------------------------------------------------
# Unbounded allocation: the memory cap
# ---------------------------------------------------------------------------------------------

MEMORY = r'''
lua { memory = "32m", budget = 3 }   -- a generous budget: the cap must be what stops it
route "/hog" {
  handler = function(req)
    local t = {}
    for i = 1, 100000 do t[i] = string.rep("x", 65536) .. i end  -- 6 GB if it were allowed
    return 200, "allocated"
  end,
}
route "/ok" { handler = function(req) return 200, "ok" end }
route "/some" {
  handler = function(req)
    local t = {}
    for i = 1, 128 do t[i] = string.rep("y", 65536) .. i end     -- 8 MB: fits
    return 200, tostring(#t)
  end,
}
'''


def test_unbounded_allocation_is_a_500_and_the_worker_lives_on():
    g = hook_gateway(MEMORY, workers=1)
    pid = one_worker(g)
    rid = assert_script_error(get(g, "/hog", timeout=10))
    assert "handler hook failed: not enough memory" in log_entry(g, rid)
    r = get(g, "/ok")
    assert r.status == 200 and r.body == b"ok", r
    assert_same_worker(g, pid)


def test_the_memory_of_a_request_that_hit_the_cap_is_reclaimed():
    """After each request that ran into the cap, its garbage must not keep the next requests
    from allocating. Eight rounds, each hog request with a different header size, so the
    cycle of the incremental GC is met at different points."""
    g = hook_gateway(MEMORY, workers=1)
    pid = one_worker(g)
    statuses = []
    for rnd in range(8):
        assert_script_error(get(g, "/hog", headers={"X-Pad": "p" * (1 + 37 * rnd)}, timeout=10))
        # The dead request's 32 MB are garbage: an 8 MB allocation must fit again.
        statuses += [(rnd, get(g, "/some").status, get(g, "/ok").status) for _ in range(3)]
    assert all(s[1:] == (200, 200) for s in statuses), (statuses, g.stderr_text()[-2000:])
    assert_same_worker(g, pid)


# ---------------------------------------------------------------------------------------------
# The sandbox
# ---------------------------------------------------------------------------------------------

SANDBOX = {
    "io": ('io.open("/etc/passwd")', "attempt to index global 'io' (a nil value)"),
    "os-execute": ('os.execute("true")', "attempt to call field 'execute' (a nil value)"),
    "os-exit": ("os.exit(0)", "attempt to call field 'exit' (a nil value)"),
    "require": ('require("ffi")', "attempt to call global 'require' (a nil value)"),
    "debug": ("debug.getinfo(1)", "attempt to index global 'debug' (a nil value)"),
    "ffi": ("ffi.C.abort()", "attempt to index global 'ffi' (a nil value)"),
    "string-dump": ("string.dump(print)", "attempt to call field 'dump' (a nil value)"),
    "string-method-dump": ('("").dump(print)', "attempt to call field 'dump' (a nil value)"),
    "bytecode": ('assert(load("\\27LJ\\2\\0\\0"))', "bytecode chunks are not allowed"),
    "bytecode-mode": ('assert(load("\\27LJ\\2\\0\\0", "x", "b"))',
                      "bytecode chunks are not allowed"),
    "dofile": ('dofile("/etc/passwd")', "attempt to call global 'dofile' (a nil value)"),
    "loadfile": ('loadfile("/etc/passwd")', "attempt to call global 'loadfile' (a nil value)"),
    "getfenv": ("getfenv(0)", "attempt to call global 'getfenv' (a nil value)"),
    "setfenv": ("setfenv(1, {})", "attempt to call global 'setfenv' (a nil value)"),
    "package": ("package.loaded", "attempt to index global 'package' (a nil value)"),
    "jit": ("jit.off()", "attempt to index global 'jit' (a nil value)"),
}


@pytest.mark.parametrize("item", sorted(SANDBOX))
def test_sandbox_items_are_unavailable(item):
    code, message = SANDBOX[item]
    g = hook_gateway('route "/s" { handler = function(req) local x = %s; '
                     'return 200, "escaped" end }\n' % code)
    r = get(g, "/s")
    rid = assert_script_error(r)
    entry = log_entry(g, rid)
    assert "handler hook failed: %s:%d:" % (g.config_path, config_line(g, 'route "/s"')) in entry
    assert message in entry, entry


def test_loaded_text_chunks_do_not_see_outside_the_sandbox():
    g = hook_gateway(r'''
route "/l" {
  handler = function(req)
    local f = assert(load("return io, os.execute, require, debug, 1 + 1"))
    local a, b, c, d, e = f()
    return 200, { nothing = a == nil and b == nil and c == nil and d == nil, sum = e }
  end,
}
''')
    r = get(g, "/l")
    assert r.status == 200 and r.json() == {"nothing": True, "sum": 2}, r


def test_a_global_assigned_at_run_time_is_an_error():
    g = hook_gateway(r'''
counter = 0                    -- a global made while the config loads
route "/new" { handler = function(req) brand_new = 1 return 200, "x" end }
route "/new-in-access" {
  access = function(req) another_one = req.path end,
  handler = function(req) return 200, "x" end,
}
route "/existing" {
  handler = function(req) counter = counter + 1 return 200, tostring(counter) end,
}
''', workers=1)
    for path, name, hook in (("/new", "brand_new", "handler"),
                             ("/new-in-access", "another_one", "access")):
        rid = assert_script_error(get(g, path))
        entry = log_entry(g, rid)
        assert "%s hook failed: %s:%d: assignment to undeclared global '%s'" % (
            hook, g.config_path, config_line(g, name + " ="), name) in entry, entry
        assert "use a local, or req.ctx for per-request state" in entry
        # Refused, not half-made: the next try fails the same way.
        assert get(g, path).status == 500
    # A global that the config made while loading may still be reassigned (the lock is on new
    # names only): it is per worker, and persists across requests.
    assert [get(g, "/existing").body for _ in range(2)] == [b"1", b"2"]


def test_two_handler_files_with_the_same_global_do_not_see_each_other():
    # The files use no sandbox global at run time (see test_a_handler_file_sees_the_sandbox).
    files = {
        "a.lua": 'shared_name = "from-a"\n'
                 "return function(req) return 200, { mine = shared_name, "
                 "config = CONFIG_ONLY == nil and \"nil\" or CONFIG_ONLY } end\n",
        "b.lua": 'local before = shared_name == nil and "nil" or shared_name\n'
                 'shared_name = "from-b"\n'
                 "return function(req) return 200, { before = before, mine = shared_name, "
                 "config = CONFIG_ONLY == nil and \"nil\" or CONFIG_ONLY } end\n",
    }
    g = hook_gateway('CONFIG_ONLY = "config"\n'
                     'route "/a" { handler = "a.lua" }\n'
                     'route "/b" { handler = "b.lua" }\n'
                     'route "/c" { handler = function(req) return 200, '
                     '{ config = CONFIG_ONLY, a = tostring(shared_name) } end }\n', files=files)
    assert get(g, "/a").json() == {"mine": "from-a", "config": "nil"}
    assert get(g, "/b").json() == {"before": "nil", "mine": "from-b", "config": "nil"}
    assert get(g, "/c").json() == {"config": "config", "a": "nil"}


# ---------------------------------------------------------------------------------------------
# A client that leaves while a hook waits; timers that fail
# ---------------------------------------------------------------------------------------------

LEAVING = r'''
route "/leave/handler" { handler = function(req) mg.sleep(0.3) return 200, "late" end }
route "/leave/access" { upstream = "u", access = function(req) mg.sleep(0.3) end }
route "/leave/body" { handler = function(req) local b = req:body() return 200, b end }
route "/leave/res-body" {
  upstream = "u",
  response = function(req, res) local b = res:body() res:set_body(b:upper()) end,
}
route "/ok" { handler = function(req) return 200, "ok" end }
'''


def slow_upstream():
    """An upstream that sends its head and half a body, then waits 0.5 s before the rest."""
    def handler(conn):
        while True:
            req = conn.read_request(timeout=10)
            if req is None:
                return
            conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
            time.sleep(0.5)
            conn.send(b"world")
    return Upstream(handler)


@pytest.mark.parametrize("path", ["/leave/handler", "/leave/access", "/leave/body",
                                  "/leave/res-body"])
def test_a_client_that_leaves_while_a_hook_waits(path):
    """The request is dropped while its coroutine waits (mg.sleep, req:body, res:body); the
    wait is cancelled, nothing is written to the closed connection, the worker lives on."""
    with slow_upstream() as up:
        g = hook_gateway(LEAVING, up=up, workers=1)
        pid = one_worker(g)
        for _ in range(2):
            c = Client(g.port)
            if path == "/leave/body":
                c.send(b"POST /leave/body HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
                       b"only part of it")
            else:
                c.send_request("GET", path)
            time.sleep(0.1)
            c.sock.close()
        time.sleep(0.5)              # past every wait: a woken task must find its request gone
        r = get(g, "/ok")
        assert r.status == 200 and r.body == b"ok", r
        assert_same_worker(g, pid)


def test_an_error_in_a_timer_is_logged_and_the_worker_goes_on():
    g = hook_gateway(r'''
route "/t" {
  handler = function(req)
    mg.timer(0.01, function() mg.sleep(0.01) error("timer-boom") end)
    return 200, "scheduled"
  end,
}
''', workers=1)
    pid = one_worker(g)
    assert get(g, "/t").body == b"scheduled"
    text = wait_log(g, "timer-boom")
    assert "timer: %s:%d: timer-boom" % (g.config_path, config_line(g, "timer-boom")) in text
    assert "stack traceback:" in text[text.index("timer-boom"):]
    assert get(g, "/t").status == 200
    assert_same_worker(g, pid)
