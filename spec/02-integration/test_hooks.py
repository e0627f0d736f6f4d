"""Lua hooks against the real binary: the phases and their order, yields in every hook,
answers from request and access hooks, the req object, response hooks and log hooks.

Each test starts the gateway on a config of hooks with a scripted upstream behind it and
checks what a client sees (status, headers, body), what the upstream received, and what the
error log says. Faults (script errors, header injection, runaway scripts, the sandbox) are in
test_hooks_faults.py; script files, `moongate check`, mg.shared and misuse of the mg API in
test_hooks_scripts.py."""

import json
import threading
import time

import pytest

from hookkit import (SHARED_READER, assert_same_worker, assert_script_error, get,
                     hook_gateway, log_entry, one_worker, raw_get, shared_value, timed)
from mgtest import Client, Upstream, request, wait_for


def chunked_upstream(chunks, gate=None, headers=(("Content-Type", "text/plain"),)):
    """An upstream answering every request with a chunked body of CHUNKS. With GATE (a
    threading.Event), it waits for the gate (3 s at most) after the first chunk."""
    def handler(conn):
        while True:
            req = conn.read_request(timeout=10)
            if req is None:
                return
            head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            head += "".join("%s: %s\r\n" % kv for kv in headers) + "\r\n"
            conn.send(head.encode())
            for i, c in enumerate(chunks):
                conn.send(b"%x\r\n%s\r\n" % (len(c), c))
                if i == 0 and gate is not None:
                    gate.wait(3)
                else:
                    time.sleep(0.01)
            conn.send(b"0\r\n\r\n")
    return Upstream(handler)


# ---------------------------------------------------------------------------------------------
# 1. The phases run in order, the global hooks before the route's, req.ctx carries values
# ---------------------------------------------------------------------------------------------

ORDER_HOOKS = r'''
local function mark(name)
  return function(req) local o = req.ctx.order or {}; o[#o + 1] = name; req.ctx.order = o end
end
hooks {
  request = mark("request"),
  access = mark("global-access"),
  response = function(req, res) mark("global-response")(req) end,
}
route "/proxy/*" {
  upstream = "u",
  access = { mark("route-access-1"), function(req)
    mark("route-access-2")(req)
    req:set_header("X-Order", table.concat(req.ctx.order, ","))
  end },
  response = function(req, res)
    mark("route-response")(req)
    res:set_header("X-Order", table.concat(req.ctx.order, ","))
  end,
}
route "/lua" {
  access = mark("route-access"),
  handler = function(req)
    mark("handler")(req)
    return 200, { order = req.ctx.order }
  end,
  response = function(req, res)
    mark("route-response")(req)
    res:set_header("X-Order", table.concat(req.ctx.order, ","))
  end,
}
'''


def test_phases_run_in_order_global_before_route_on_a_proxied_route(echo_upstream):
    g = hook_gateway(ORDER_HOOKS, up=echo_upstream)
    r = get(g, "/proxy/x")
    assert r.status == 200, r
    seen = echo_upstream.wait_requests(1)[0]
    # What the upstream got was set by the last access hook: request, then access hooks.
    assert seen.header("X-Order") == "request,global-access,route-access-1,route-access-2"
    # The response hooks ran after the upstream answered, the global one first.
    assert r.header("x-order") == ("request,global-access,route-access-1,route-access-2,"
                                   "global-response,route-response")
    assert r.json()["target"] == "/proxy/x"


def test_phases_run_in_order_around_a_lua_handler():
    g = hook_gateway(ORDER_HOOKS)
    r = get(g, "/lua")
    assert r.status == 200, r
    assert r.json() == {"order": ["request", "global-access", "route-access", "handler"]}
    assert r.header("x-order") == ("request,global-access,route-access,handler,"
                                   "global-response,route-response")


def test_req_ctx_is_per_request():
    """req.ctx starts empty for every request, even on the same keep-alive connection."""
    g = hook_gateway(r'''
route "/ctx" {
  access = function(req) req.ctx.seen = (req.ctx.seen or 0) + 1 end,
  handler = function(req) return 200, { seen = req.ctx.seen } end,
}
''')
    with Client(g.port) as c:
        for _ in range(3):
            r = c.request("GET", "/ctx")
            assert r.status == 200 and json.loads(r.body) == {"seen": 1}, r


def test_request_hook_runs_before_routing():
    """The global request hook sees paths that no route matches, and may answer them or
    re-route them."""
    g = hook_gateway(r'''
hooks {
  request = function(req)
    if req.path == "/teapot" then return 418, { route = req.route or "none" } end
    if req.path == "/alias" then req:set_path("/real") end
  end,
}
route "/real" { handler = function(req) return 200, "real" end }
''')
    r = get(g, "/teapot")
    assert r.status == 418 and r.json() == {"route": "none"}, r
    assert get(g, "/alias").body == b"real"
    assert get(g, "/nothing").status == 404


def test_pipelined_requests_with_sleeping_hooks_are_answered_in_order():
    g = hook_gateway(r'''
route "/p/:n" {
  handler = function(req)
    mg.sleep(0.05 * (4 - tonumber(req.params.n)))   -- the first one sleeps longest
    return 200, req.params.n
  end,
}
''', workers=1)
    with Client(g.port) as c:
        c.send(b"".join(b"GET /p/%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in (1, 2, 3)))
        bodies = [c.read_response(timeout=5) for _ in range(3)]
    assert [r.body for r in bodies if r is not None] == [b"1", b"2", b"3"], bodies


def test_head_request_to_a_lua_handler_has_no_body():
    g = hook_gateway('route "GET /h" { handler = function(req) '
                     'return 200, { method = req.method } end }\n')
    with Client(g.port) as c:
        r = c.request("HEAD", "/h")
        assert r is not None and r.status == 200 and r.body == b"", r
        assert r.header("content-length") == str(len(b'{"method":"HEAD"}'))
        # The connection is still in step: the next answer is a whole one.
        r = c.request("GET", "/h")
        assert r.json() == {"method": "GET"}, r


# ---------------------------------------------------------------------------------------------
# 2. Every hook may yield: mg.sleep in request, access, handler, response, a timer, and inside
#    the script's own coroutines
# ---------------------------------------------------------------------------------------------

YIELDS = r'''
shared "d" { size = "1m" }
hooks {
  request = function(req)
    if req.path:sub(1, 3) ~= "/y/" then return end
    mg.sleep(0.01)
    req.ctx.steps = { "request" }
  end,
}
route "/y/*" {
  upstream = "u",
  access = function(req)
    mg.sleep(0.01)
    table.insert(req.ctx.steps, "access")
    req:set_header("X-Steps", table.concat(req.ctx.steps, ","))
  end,
  response = function(req, res)
    mg.sleep(0.01)
    local body = res:body()
    mg.sleep(0.01)
    table.insert(req.ctx.steps, "response")
    res:set_header("X-Steps", table.concat(req.ctx.steps, ","))
    res:set_body("seen " .. #body .. " bytes")
  end,
}
route "/lua" {
  handler = function(req)
    mg.sleep(0.01)
    -- The script's own coroutine: values go in and out through yield and resume, and an
    -- mg.sleep inside it suspends the whole request, then comes back into the coroutine.
    local co = coroutine.wrap(function(a)
      mg.sleep(0.01)
      local b = coroutine.yield(a + 1)
      mg.sleep(0.01)
      return b * 2
    end)
    local first = co(1)
    local second = co(10)
    -- A timer that sleeps, then leaves a mark in the shared dictionary.
    local ok = mg.timer(0.01, function(key)
      mg.sleep(0.05)
      mg.shared.d:set(key, "timer slept")
    end, "timer-" .. req.args.k)
    return 200, { first = first, second = second, timer = ok }
  end,
}
''' + SHARED_READER


def test_mg_sleep_in_request_access_and_response_hooks(echo_upstream):
    g = hook_gateway(YIELDS, up=echo_upstream)
    r = get(g, "/y/a")
    assert r.status == 200, r
    assert echo_upstream.wait_requests(1)[0].header("X-Steps") == "request,access"
    assert r.header("x-steps") == "request,access,response"
    assert r.body.startswith(b"seen ") and int(r.body[5:].split()[0]) > 50, r.body


def test_mg_sleep_in_a_handler_a_user_coroutine_and_a_timer():
    g = hook_gateway(YIELDS)
    r = get(g, "/lua?k=one")
    assert r.status == 200, r
    assert r.json() == {"first": 2, "second": 20, "timer": True}
    # The timer runs after the answer and sleeps 50 ms before it writes.
    assert wait_for(lambda: shared_value(g, "timer-one") == "timer slept", timeout=3), \
        g.stderr_text()[-3000:]


SLEEPERS = r'''
hooks {
  request = function(req) if req.path == "/slow/request" then mg.sleep(0.3) end end,
}
route "/slow/request" { handler = function(req) return 200, "request" end }
route "/slow/access" {
  access = function(req) mg.sleep(0.3) end,
  handler = function(req) return 200, "access" end,
}
route "/slow/handler" { handler = function(req) mg.sleep(0.3) return 200, "handler" end }
route "/slow/response" {
  handler = function(req) return 200, "response" end,
  response = function(req, res) mg.sleep(0.3) end,
}
'''


@pytest.mark.parametrize("hook", ["request", "access", "handler", "response"])
def test_a_sleeping_hook_does_not_block_its_worker(hook):
    """One worker, three requests that each sleep 0.3 s in the hook, sent at once on three
    connections: all three are answered in well under 3 x 0.3 s."""
    g = hook_gateway(SLEEPERS, workers=1)
    results = []

    def one():
        results.append(get(g, "/slow/" + hook))

    threads = [threading.Thread(target=one) for _ in range(3)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    took = time.monotonic() - t0
    assert [r.status for r in results] == [200, 200, 200], results
    assert all(r.body == hook.encode() for r in results), results
    assert 0.29 <= took < 0.8, "three 0.3 s sleeps took %.2f s on one worker" % took


# ---------------------------------------------------------------------------------------------
# 3. Request and access hooks may answer: the upstream sees nothing
# ---------------------------------------------------------------------------------------------

SHORT = r'''
shared "d" { size = "1m" }
hooks {
  request = function(req)
    if req.path == "/closed" then
      return 401, { error = "login first" }, { ["WWW-Authenticate"] = 'Bearer realm="api"' }
    end
  end,
}
route "/closed" { upstream = "u" }
route "/guarded" {
  upstream = "u",
  access = {
    function(req)
      if req:header("Authorization") ~= "Bearer good" then
        return 403, { error = "forbidden", who = req.client }, { ["X-Denied-By"] = "access" }
      end
    end,
    function(req) mg.shared.d:incr("second-access") end,
  },
  response = function(req, res) res:set_header("X-Response-Hook", "ran") end,
}
''' + SHARED_READER


def test_request_hook_answers_401_and_the_upstream_sees_nothing(upstream):
    g = hook_gateway(SHORT, up=upstream)
    r = get(g, "/closed")
    assert r.status == 401, r
    assert r.json() == {"error": "login first"}
    assert r.header("content-type").startswith("application/json")
    assert r.header("www-authenticate") == 'Bearer realm="api"'
    assert r.header("x-request-id")
    assert upstream.wait_requests(1, timeout=0.3) == [] and upstream.connections == 0
    line = g.access_log(1)[-1]
    assert line["status"] == 401 and line["path"] == "/closed", line


def test_access_hook_answers_403_and_the_rest_of_the_list_does_not_run(upstream):
    g = hook_gateway(SHORT, up=upstream)
    r = get(g, "/guarded", headers={"Authorization": "Bearer bad"})
    assert r.status == 403, r
    assert r.json() == {"error": "forbidden", "who": "127.0.0.1"}
    assert r.header("x-denied-by") == "access"
    assert upstream.wait_requests(1, timeout=0.3) == [] and upstream.connections == 0
    assert shared_value(g, "second-access") is None
    # The same route with the right credentials goes through both hooks to the upstream.
    r = get(g, "/guarded", headers={"Authorization": "Bearer good"})
    assert r.status == 200 and r.body == b"ok", r
    assert r.header("x-response-hook") == "ran"
    assert len(upstream.wait_requests(1)) == 1
    assert shared_value(g, "second-access") == 1


def test_an_answer_with_a_string_body_and_a_content_type():
    g = hook_gateway(r'''
route "/text" { handler = function() return 200, "plain words" end }
route "/html" { handler = function() return 201, "<b>x</b>", { ["Content-Type"] = "text/html" } end }
route "/empty" { handler = function() return 204 end }
route "/list" { handler = function() return 200, "x", { ["X-Multi"] = { "a", "b" } } end }
''')
    r = get(g, "/text")
    assert (r.status, r.body) == (200, b"plain words") and r.header("content-type").startswith(
        "text/plain"), r
    r = get(g, "/html")
    assert (r.status, r.body, r.header("content-type")) == (201, b"<b>x</b>", "text/html"), r
    r = get(g, "/empty")
    assert (r.status, r.body) == (204, b""), r
    data, rs = raw_get(g.port, "/list")
    assert rs[0].status == 200 and b"\r\nX-Multi: a\r\n" in data and b"\r\nX-Multi: b\r\n" in data


# ---------------------------------------------------------------------------------------------
# 4. The req object
# ---------------------------------------------------------------------------------------------

FIELDS = r'''
route "GET /items/:id/parts/:part" {
  handler = function(req)
    return 200, {
      method = req.method, path = req.path, query = req.query, args = req.args,
      params = req.params, host = req.host, client = req.client, id = req.id,
      route = req.route, target = req.target, version = req.version,
      h_lower = req.headers["x-test"], h_upper = req.headers["X-TEST"],
      h_method = req:header("X-Test"), h_missing = req:header("X-Missing") == nil,
      repeated = req:header("X-Rep"),
    }
  end,
}
'''


def test_req_fields():
    g = hook_gateway(FIELDS)
    with Client(g.port) as c:
        r = c.request("GET", "/items/42/parts/wheel?a=1&b=x%20y&a=2&flag&plus=c+d&a=3&e=",
                      headers=[("Host", "api.example.com:8080"), ("X-Test", "val"),
                               ("X-Rep", "one"), ("X-Rep", "two")], version="HTTP/1.0")
    assert r.status == 200, r
    doc = r.json()
    assert doc["method"] == "GET"
    assert doc["path"] == "/items/42/parts/wheel"
    assert doc["query"] == "a=1&b=x%20y&a=2&flag&plus=c+d&a=3&e="
    assert doc["args"] == {"a": ["1", "2", "3"], "b": "x y", "flag": True, "plus": "c d",
                           "e": ""}
    assert doc["params"] == {"id": "42", "part": "wheel"}
    assert doc["host"] == "api.example.com"          # the Host header without its port
    assert doc["client"] == "127.0.0.1"
    assert doc["id"] == r.header("x-request-id")
    assert doc["route"] == "GET /items/:id/parts/:part"
    assert doc["target"] == "/items/42/parts/wheel?a=1&b=x%20y&a=2&flag&plus=c+d&a=3&e="
    assert doc["version"] == 1.0
    assert doc["h_lower"] == doc["h_upper"] == doc["h_method"] == "val"
    assert doc["h_missing"] is True
    assert doc["repeated"] == "one, two"


def test_req_route_is_the_route_name_and_version_11():
    g = hook_gateway(r'''
route "GET /n" {
  name = "my-route",
  handler = function(req) return 200, { route = req.route, version = req.version } end,
}
''')
    assert get(g, "/n").json() == {"route": "my-route", "version": 1.1}


def test_req_fields_are_read_only_and_other_keys_are_free():
    g = hook_gateway(r'''
route "/ro/:f" {
  access = function(req)
    if req.params.f == "method" then req.method = "POST" end
    if req.params.f == "path" then req.path = "/elsewhere" end
    if req.params.f == "headers" then req.headers = {} end
    req.consumer = { name = "alice" }
  end,
  handler = function(req) return 200, { consumer = req.consumer.name, method = req.method } end,
}
''')
    assert get(g, "/ro/none").json() == {"consumer": "alice", "method": "GET"}
    for field, hint in (("method", ""), ("path", " (use req:set_path in a request hook)"),
                        ("headers", " (use req:set_header)")):
        r = get(g, "/ro/" + field)
        rid = assert_script_error(r)
        entry = log_entry(g, rid)
        assert "access hook failed" in entry, entry
        assert "req.%s is read-only%s" % (field, hint) in entry, entry


def test_req_params_read_before_routing_are_not_kept_for_the_route():
    """req.params is {} in the global request hook; the route's hooks then see its captures."""
    g = hook_gateway(r'''
hooks { request = function(req) req.ctx.before = next(req.params) == nil end }
route "/p/:id" {
  access = function(req) req.ctx.access = req.params.id end,
  handler = function(req)
    return 200, { before = req.ctx.before, access = req.ctx.access, id = req.params.id }
  end,
}
''')
    assert get(g, "/p/42").json() == {"before": True, "access": "42", "id": "42"}


def test_req_kept_after_its_request_keeps_the_scripts_keys_not_the_fields():
    """A req kept by a timer: keys the script set stay readable, the fields of a request
    without log hooks read nil (req.ctx too, never read during the request), and methods on
    it still answer (req:header: nil)."""
    g = hook_gateway(r'''
shared "d" { size = "1m" }
route "/keep" {
  access = function(req) req.note = "mine" end,
  handler = function(req)
    local seen_method = req.method
    mg.timer(0.05, function()
      local d = mg.shared.d
      d:set("kept", table.concat({ seen_method, tostring(req.note), tostring(req.method),
                                   tostring(req:header("host")), tostring(req.ctx) }, "|"))
    end)
    return 200, { note = req.note }
  end,
}
''' + SHARED_READER)
    with Client(g.port) as c:
        for _ in range(2):
            r = c.request("GET", "/keep")
            assert r.status == 200 and json.loads(r.body) == {"note": "mine"}, r
    assert wait_for(lambda: shared_value(g, "kept") is not None, timeout=3), g.stderr_text()
    assert shared_value(g, "kept") == "GET|mine|nil|nil|nil"


def test_set_header_reaches_the_upstream_and_nil_removes_an_incoming_header(echo_upstream):
    g = hook_gateway(r'''
route "/h" {
  upstream = "u",
  access = function(req)
    local cached = req.headers["x-secret"]     -- req.headers is read (and kept) first
    req:set_header("X-User", "alice")
    req:set_header("X-Secret", nil)
    req:set_header("X-Count", 3)
    req:set_header("X-Replaced", "new")
    -- What later code reads is the edited view.
    req.ctx.view = cached .. "/" .. tostring(req:header("x-secret")) .. "/" ..
                   tostring(req.headers["x-secret"]) .. "/" .. req.headers["x-user"] .. "/" ..
                   req:header("X-Replaced")
  end,
  response = function(req, res) res:set_header("X-View", req.ctx.view) end,
}
''', up=echo_upstream)
    r = get(g, "/h", headers={"X-Secret": "s3cr3t", "X-Replaced": "old", "X-Keep": "k"})
    assert r.status == 200, r
    seen = echo_upstream.wait_requests(1)[0]
    assert seen.header("X-User") == "alice"
    assert seen.header("X-Count") == "3"
    assert seen.header_all("X-Replaced") == ["new"]
    assert seen.header("X-Keep") == "k"
    assert "x-secret" not in seen.header_names(), seen.headers
    assert b"s3cr3t" not in seen.raw
    assert r.header("x-view") == "s3cr3t/nil/nil/alice/new"


@pytest.mark.parametrize("name", ["Content-Length", "Transfer-Encoding", "Host", "Connection"])
def test_set_header_refuses_headers_the_gateway_sets(upstream, name):
    g = hook_gateway('route "/h" { upstream = "u", access = function(req) '
                     'req:set_header("%s", "1") end }\n' % name, up=upstream)
    r = get(g, "/h")
    rid = assert_script_error(r)
    assert "req:set_header: %s is set by the gateway" % name in log_entry(g, rid)
    assert upstream.connections == 0


SET_PATH = r'''
hooks {
  request = function(req)
    if req.path == "/old" then req:set_path("/new/place?from=old") end
    if req.path == "/bad" then req:set_path("no-slash") end
  end,
}
route "/old" { respond = { 410, "the old route must not answer" } }
route "/new/*" {
  upstream = "u",
  access = function(req)
    req:set_header("X-Seen", req.path .. "|" .. req.query .. "|" .. req.route)
  end,
}
'''


def test_set_path_in_a_request_hook_reroutes(echo_upstream):
    g = hook_gateway(SET_PATH, up=echo_upstream)
    r = get(g, "/old")
    assert r.status == 200, r
    seen = echo_upstream.wait_requests(1)[0]
    assert seen.target == "/new/place?from=old"
    assert seen.header("X-Seen") == "/new/place|from=old|/new/*"


def test_set_path_refuses_a_path_without_a_slash(echo_upstream):
    g = hook_gateway(SET_PATH, up=echo_upstream)
    rid = assert_script_error(get(g, "/bad"))
    assert "req:set_path: the path must start with /" in log_entry(g, rid)
    assert echo_upstream.connections == 0


@pytest.mark.parametrize("path", ["/public/../admin", "/public/%2e%2e/admin", "//admin",
                                  "/%61dmin"])
def test_set_path_is_normalised_like_a_client_path(echo_upstream, path):
    """A client sending any of these paths gets /admin's 403 (see test_router); a request hook
    that sets them must not get around /admin's access hook either."""
    g = hook_gateway(r'''
hooks { request = function(req) if req.path == "/go" then req:set_path(req.args.to) end end }
route "/public/*" { upstream = "u" }
route "/admin" { upstream = "u", access = function(req) return 403, "no admin" end }
''', up=echo_upstream)
    direct = raw_get(g.port, path)[1][0]
    assert (direct.status, direct.body) == (403, b"no admin"), direct
    r = get(g, "/go?to=" + path.replace("%", "%25"))
    assert r.status in (403, 500), r            # routed as /admin, or refused
    assert echo_upstream.connections == 0, echo_upstream.requests


BODIES = r'''
route "POST /body" {
  max_body = 1000,
  handler = function(req)
    local b, err = req:body()
    if not b then return 200, { ok = false, err = err } end
    local again = req:body()
    local j, jerr = req:json()
    return 200, { ok = true, len = #b, same = again == b, name = j and j.name or mg.json.null,
                  jerr = jerr or mg.json.null }
  end,
}
route "POST /forward" {
  upstream = "u",
  access = function(req)
    local b = req:body()
    req:set_header("X-Body-Len", #b)
  end,
}
'''


def test_req_body_and_json_with_a_content_length():
    g = hook_gateway(BODIES)
    r = request(g.port, "POST", "/body", body=b'{"name": "ada", "pad": "xxxx"}',
                headers={"Content-Type": "application/json"})
    assert r.status == 200, r
    assert r.json() == {"ok": True, "len": 30, "same": True, "name": "ada", "jerr": None}


def test_req_body_of_a_chunked_request_that_arrives_slowly():
    """req:body() waits (yields) until the last chunk is in."""
    g = hook_gateway(BODIES)
    with Client(g.port) as c:
        c.send(b"POST /body HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"9\r\n{\"name\": \r\n")
        assert c.read_response(timeout=0.3) is None      # no answer before the body is in
        c.send(b"5\r\n\"bob\"\r\n")
        time.sleep(0.05)
        c.send(b"1\r\n}\r\n0\r\n\r\n")
        r = c.read_response(timeout=5)
    assert r is not None and r.status == 200, r
    assert r.json() == {"ok": True, "len": 15, "same": True, "name": "bob", "jerr": None}


def test_req_json_of_a_body_that_is_not_json():
    g = hook_gateway(BODIES)
    r = request(g.port, "POST", "/body", body=b"not json")
    doc = r.json()
    assert doc["ok"] is True and doc["name"] is None and isinstance(doc["jerr"], str) and \
        doc["jerr"], doc


def test_req_body_over_max_body_with_a_content_length_is_nil_err():
    g = hook_gateway(BODIES)
    r = request(g.port, "POST", "/body", body=b"x" * 1001)
    assert r.status == 200, r
    assert r.json() == {"ok": False, "err": "request body too large (limit 1000 bytes)"}


def test_req_body_over_max_body_chunked_is_413():
    # Without a declared length the gateway's own body limit answers first: 413 and close,
    # as for any streamed body over max_body (README "Fault containment").
    g = hook_gateway(BODIES)
    with Client(g.port) as c:
        c.send(b"POST /body HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3e8\r\n" + b"x" * 1000 + b"\r\n2\r\nxx\r\n0\r\n\r\n")
        r = c.read_response(timeout=5)
    assert r is not None and r.status == 413, r


def test_a_body_read_by_an_access_hook_still_reaches_the_upstream(echo_upstream):
    g = hook_gateway(BODIES, up=echo_upstream)
    with Client(g.port) as c:
        c.send(b"POST /forward HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        r = c.read_response(timeout=5)
    assert r is not None and r.status == 200, r
    seen = echo_upstream.wait_requests(1)[0]
    assert seen.body == b"hello world"
    assert seen.header("Content-Length") == "11" and not seen.chunked
    assert seen.header("X-Body-Len") == "11"


# ---------------------------------------------------------------------------------------------
# 5. Response hooks
# ---------------------------------------------------------------------------------------------

def test_response_hook_changes_status_sets_and_removes_headers():
    up = Upstream.fixed(200, b"payload", {"X-Remove": "secret", "X-Keep": "k",
                                          "Content-Type": "text/plain"})
    with up:
        g = hook_gateway(r'''
route "/r" {
  upstream = "u",
  response = function(req, res)
    res.status = res.status + 1
    res:set_header("X-Added", "yes")
    res:set_header("X-Remove", nil)
    res.headers["x-direct"] = "assigned"
    res:set_header("X-Upstream-Type", res:header("Content-Type"))
  end,
}
''', up=up)
        data, rs = raw_get(g.port, "/r")
    assert len(rs) == 1, data
    r = rs[0]
    assert r.status == 201 and r.body == b"payload", r
    assert r.header("x-added") == "yes" and r.header("x-direct") == "assigned"
    assert r.header("x-keep") == "k"
    assert r.header("x-upstream-type") == "text/plain"
    assert r.header("x-remove") is None and b"secret" not in data


def test_response_hook_rewrites_a_chunked_body_whole():
    up = chunked_upstream([b'{"a": 1, ', b'"list": [1, 2', b', 3]}'],
                          headers=(("Content-Type", "application/json"),))
    with up:
        g = hook_gateway(r'''
route "/whole" {
  upstream = "u",
  response = function(req, res)
    local doc = mg.json.decode(res:body())
    doc.added = true
    doc.count = #doc.list
    res:set_body(doc)
  end,
}
''', up=up)
        data, rs = raw_get(g.port, "/whole")
    r = rs[0]
    assert r.status == 200 and r.complete, data
    assert r.json() == {"a": 1, "list": [1, 2, 3], "added": True, "count": 3}
    assert r.header("content-type") == "application/json"
    assert r.header("content-length") == str(len(r.body)) or r.header("transfer-encoding")


def test_response_hook_filters_a_chunked_body_as_it_streams():
    gate = threading.Event()
    up = chunked_upstream([b"hello ", b"streamed ", b"world"], gate=gate)
    with up:
        g = hook_gateway(r'''
route "/upper" {
  upstream = "u",
  response = function(req, res)
    res:filter(function(chunk, eof)
      if eof then return chunk:upper() .. "<END>" end
      return chunk:upper()
    end)
  end,
}
''', up=up)
        with Client(g.port) as c:
            c.send_request("GET", "/upper")
            # The first chunk arrives, upper-cased, while the upstream still holds the rest.
            deadline = time.monotonic() + 3
            while b"HELLO" not in c.buf and not c.eof and time.monotonic() < deadline:
                c._fill(0.1)
            streamed = b"HELLO" in c.buf
            gate.set()
            r = c.read_response(timeout=5)
    assert streamed, "the filtered first chunk did not arrive before the rest was sent"
    assert r is not None and r.status == 200, r
    assert r.body == b"HELLO STREAMED WORLD<END>", r.body


def test_response_hooks_on_a_body_larger_than_the_buffers():
    """1 MiB from the upstream: res:body() gets all of it, and a filter sees every byte."""
    big = bytes(ord("a") + i % 26 for i in range(1 << 20))
    up = chunked_upstream([big[i:i + 65536] for i in range(0, len(big), 65536)])
    with up:
        g = hook_gateway(r'''
route "/whole" {
  upstream = "u",
  response = function(req, res)
    local b = res:body()
    res:set_body(#b .. ":" .. b:sub(1, 3) .. b:sub(-3))
  end,
}
route "/filtered" {
  upstream = "u",
  response = function(req, res) res:filter(function(chunk) return chunk:upper() end) end,
}
''', up=up)
        r = get(g, "/whole", timeout=10)
        assert r.status == 200 and r.body == b"1048576:abctuv", r
        r = get(g, "/filtered", timeout=10)
    assert r.status == 200 and r.body == big.upper(), (r.status, len(r.body))


def test_response_hook_replaces_the_answer_by_returning_values(upstream):
    g = hook_gateway(r'''
route "/replace" {
  upstream = "u",
  response = function(req, res)
    return 418, { was = res.status, replaced = true }, { ["X-Replaced"] = "1" }
  end,
}
''', up=upstream)
    r = get(g, "/replace")
    assert r.status == 418, r
    assert r.json() == {"was": 200, "replaced": True}
    assert r.header("x-replaced") == "1"
    assert r.header("content-type").startswith("application/json")
    assert len(upstream.wait_requests(1)) == 1


def test_response_hook_on_a_lua_handler_answer():
    g = hook_gateway(r'''
route "/hl" {
  handler = function(req) return 200, "abc", { ["X-From"] = "handler" } end,
  response = function(req, res)
    res.status = 202
    res:set_header("X-From", res:header("x-from") .. "+response")
    res:set_body(res:body() .. "!")
  end,
}
''')
    r = get(g, "/hl")
    assert (r.status, r.body) == (202, b"abc!"), r
    assert r.header("x-from") == "handler+response"
    assert r.header("content-length") == "4"


def test_response_hook_sees_an_upstream_error_status():
    up = Upstream.fixed(503, b"down", {"Retry-After": "5"})
    with up:
        g = hook_gateway(r'''
route "/e" {
  upstream = "u",
  response = function(req, res)
    if res.status >= 500 then
      return 502, { error = "backend unavailable", retry = res.headers["retry-after"] }
    end
  end,
}
''', up=up)
        r = get(g, "/e")
    assert r.status == 502 and r.json() == {"error": "backend unavailable", "retry": "5"}, r


# ---------------------------------------------------------------------------------------------
# 6. Log hooks run after the response is written
# ---------------------------------------------------------------------------------------------

LOGGED = r'''
shared "d" { size = "1m" }
route "/logged" {
  upstream = "u",
  access = function(req) req.ctx.note = "from-access" end,
  response = function(req, res) req.ctx.response_ran = true end,
  log = function(req, res)
    mg.sleep(0.5)
    local d = mg.shared.d
    d:set("status", res.status)
    d:set("method", req.method)
    d:set("path", req.path)
    d:set("id", req.id)
    d:set("route", req.route)
    d:set("note", req.ctx.note)
    d:set("after_response", req.ctx.response_ran == true)
    d:set("upstream", res.upstream or "none")
    d:set("sent", res.bytes_sent > 0)
    d:set("timed", res.duration >= 0 and res.upstream_time ~= nil)
    d:incr("done")
  end,
}
route "/quiet" { upstream = "u", log = function(req, res) end }
''' + SHARED_READER


def test_log_hook_runs_after_the_response_and_sees_the_request(upstream):
    g = hook_gateway(LOGGED, up=upstream)
    r, took = timed(lambda: get(g, "/logged"))
    assert r.status == 200 and took < 0.45, (r, took)
    # The client has its answer while the log hook still sleeps.
    assert shared_value(g, "done") is None
    assert wait_for(lambda: shared_value(g, "done") == 1, timeout=3), g.stderr_text()[-3000:]
    assert shared_value(g, "status") == 200
    assert shared_value(g, "method") == "GET"
    assert shared_value(g, "path") == "/logged"
    assert shared_value(g, "id") == r.header("x-request-id")
    assert shared_value(g, "route") == "/logged"
    assert shared_value(g, "note") == "from-access"
    assert shared_value(g, "after_response") is True
    assert shared_value(g, "upstream") == "u"
    assert shared_value(g, "sent") is True and shared_value(g, "timed") is True


def test_a_route_with_a_log_hook_keeps_its_worker(upstream):
    g = hook_gateway(LOGGED, up=upstream, workers=1)
    pid = one_worker(g)
    for _ in range(3):
        assert get(g, "/quiet").status == 200
    time.sleep(0.2)
    assert_same_worker(g, pid)


def test_log_hook_does_not_delay_the_next_request_on_the_connection(upstream):
    g = hook_gateway(LOGGED, up=upstream, workers=1)
    with Client(g.port) as c:
        t0 = time.monotonic()
        for _ in range(3):
            r = c.request("GET", "/logged")
            assert r is not None and r.status == 200, r
        assert time.monotonic() - t0 < 0.45, "log hooks delayed the connection"
    assert wait_for(lambda: shared_value(g, "done") == 3, timeout=3), g.stderr_text()[-3000:]
