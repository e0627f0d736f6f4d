"""mg.fetch, mg.fetch_all and mg.aggregate through the gateway: a Lua handler that calls
three real backends in parallel and answers one JSON document, the partial-result signal,
deadlines, and the keep-alive pools they share with the proxy."""

import json
import threading
import time

from mgtest import Upstream, http_response, request

from hookkit import get, hook_gateway


def json_backend(routes, delays=None):
    """An upstream answering GET PATH with the JSON of ROUTES[PATH] (404 otherwise), after
    DELAYS[PATH] seconds; keep-alive."""
    delays = delays or {}

    def handler(conn):
        while True:
            req = conn.read_request(timeout=30)
            if req is None:
                return
            path = req.target.split("?")[0]
            time.sleep(delays.get(path, 0))
            if path in routes:
                body = json.dumps(routes[path]).encode()
                conn.send(http_response(200, body, {"Content-Type": "application/json"}))
            else:
                conn.send(http_response(404, b'{"error":"no"}'))

    return Upstream(handler)


BACKENDS = {
    "/users/7": {"id": 7, "name": "Ada", "big": 0},
    "/orders": [{"id": 101, "total": 25.5}, {"id": 102, "total": 12}],
    "/reviews/7": [],
}


def three(upstream, extra=""):
    return '''
upstream "b" { "%s" }
route "GET /summary/:id" {
  handler = function(req)
    local id = req.params.id
    return mg.aggregate {
      { "b", "/users/" .. id, key = "user", required = true },
      { "b", { path = "/orders", query = { user = id } }, key = "orders" },
      { "b", "/reviews/" .. id, key = "reviews", timeout = 0.3 },
      timeout = 2,
    }
  end,
}
route "GET /by-hand" {
  handler = function(req)
    local u, o, r, errs = mg.fetch_all {
      { "b", "/users/7" }, { "b", "/orders" }, { "b", "/nope" }, timeout = 2 }
    return 200, { user = u.json, orders = o.json, nope = r.status, errs = errs }
  end,
}
%s
''' % (upstream.addr, extra)


def test_three_backends_in_one_document():
    up = json_backend(BACKENDS)
    g = hook_gateway(three(up))
    r = get(g, "/summary/7")
    assert r.status == 200, r
    assert r.header("x-moongate-completed") == "true"
    assert r.json() == {"user": BACKENDS["/users/7"], "orders": BACKENDS["/orders"],
                        "reviews": []}
    # The empty array stays an array, the query went out encoded.
    assert b'"reviews":[]' in r.body
    assert sorted(q.target for q in up.requests) == ["/orders?user=7", "/reviews/7", "/users/7"]


def test_calls_run_in_parallel():
    # Each backend call waits until all three have arrived (up to 5 s): in series the first
    # would never see the others and the reviews call (0.3 s timeout) would fail. No timing
    # bound on the client side.
    arrived = threading.Semaphore(0)
    lock = threading.Lock()
    seen = {"n": 0}

    def handler(conn):
        while True:
            req = conn.read_request(timeout=30)
            if req is None:
                return
            with lock:
                seen["n"] += 1
                if seen["n"] == 3:
                    for _ in range(3):
                        arrived.release()
            together = arrived.acquire(timeout=5)
            path = req.target.split("?")[0]
            body = json.dumps({"together": together, "path": path}).encode()
            conn.send(http_response(200, body, {"Content-Type": "application/json"}))

    up = Upstream(handler)
    g = hook_gateway(three(up).replace("timeout = 0.3", "timeout = 3"))
    r = get(g, "/summary/7", timeout=10)
    assert r.status == 200 and r.header("x-moongate-completed") == "true", r
    doc = r.json()
    assert [doc[k]["together"] for k in ("user", "orders", "reviews")] == [True] * 3, doc


def test_a_slow_backend_gives_a_partial_answer():
    up = json_backend(BACKENDS, delays={"/reviews/7": 1.0})
    g = hook_gateway(three(up))
    r = get(g, "/summary/7")
    assert r.status == 200, r
    assert r.header("x-moongate-completed") == "false"
    doc = r.json()
    assert doc["user"] == BACKENDS["/users/7"] and doc["orders"] == BACKENDS["/orders"]
    assert doc["reviews"] is None
    assert doc["_errors"] == [{"backend": "reviews", "target": "b",
                               "error": "b: timeout after 0.3s"}]


def test_a_required_backend_failing_is_a_502():
    up = json_backend({"/orders": [], "/reviews/9": []})
    g = hook_gateway(three(up))
    r = get(g, "/summary/9")
    assert r.status == 502, r
    assert r.header("x-moongate-completed") == "false"
    doc = r.json()
    assert doc["error"] == 'backend "user" failed' and doc["status"] == 502
    assert doc["_errors"] == [{"backend": "user", "target": "b", "error": "status 404"}]
    # The gateway's error shape: the request id, as in X-Request-Id.
    assert doc["request_id"] == r.header("x-request-id") and len(doc["request_id"]) == 32, doc


def test_fetch_all_by_hand_returns_results_in_order_and_the_errors():
    up = json_backend(BACKENDS)
    g = hook_gateway(three(up))
    r = get(g, "/by-hand")
    assert r.status == 200, r
    # A non-2xx answer is a result, not an error: the errors table is empty.
    assert r.json() == {"user": BACKENDS["/users/7"], "orders": BACKENDS["/orders"],
                        "nope": 404, "errs": {}}


def test_a_dead_backend_is_nil_and_an_error():
    g = hook_gateway('''
upstream "dead" { "127.0.0.1:1" }
route "GET /d" {
  handler = function(req)
    local res, err = mg.fetch("dead", "/x")
    local a, b, errs = mg.fetch_all { { "dead", "/x" }, { "dead", "/y" } }
    return 200, { res = res == nil, err = err, a = a == nil, errs = errs }
  end,
}
''')
    r = get(g, "/d")
    assert r.status == 200, r
    assert r.json() == {"res": True, "err": "dead: connection refused", "a": True,
                        # errs maps indexes 1 and 2: a Lua list, so a JSON array
                        "errs": ["dead: connection refused", "dead: connection refused"]}


def test_fetch_shares_the_keepalive_pool_with_the_proxy():
    up = json_backend(BACKENDS)
    g = hook_gateway('''
upstream "b" { "%s" }
route "GET /users/*" { upstream = "b" }
route "GET /via-lua" { handler = function(req)
  local res = mg.fetch("b", "/users/7")
  return res.status, res.body, { ["Content-Type"] = "application/json" }
end }
''' % up.addr)
    for path in ["/users/7", "/via-lua", "/users/7", "/via-lua"]:
        r = get(g, path)
        assert r.status == 200 and r.json() == BACKENDS["/users/7"], r
    # One worker, sequential requests: the proxy and mg.fetch reuse one pooled connection.
    assert up.connections == 1, up.connections


def test_big_integers_pass_through_unchanged():
    ids = '{"id":9007199254740993,"ref":-123456789012345678901234567890}'

    def handler(conn):
        while conn.read_request(timeout=30) is not None:
            conn.send(http_response(200, ids.encode(), {"Content-Type": "application/json"}))

    up = Upstream(handler)
    g = hook_gateway('''
upstream "i" { "%s" }
route "GET /ids" { handler = function(req)
  local res = mg.fetch("i", "/")
  return 200, { wrapped = res.json, text = tostring(res.json.id) }
end }
''' % up.addr)
    r = get(g, "/ids")
    assert r.status == 200, r
    assert b'"wrapped":{' in r.body and b"9007199254740993" in r.body
    assert b"-123456789012345678901234567890" in r.body
    assert json.loads(r.body)["text"] == "9007199254740993"


def test_a_post_with_a_json_body_and_headers():
    seen = []

    def handler(conn):
        while True:
            req = conn.read_request(timeout=30)
            if req is None:
                return
            seen.append(req)
            conn.send(http_response(201, b'{"ok":true}', {"Content-Type": "application/json"}))

    up = Upstream(handler)
    g = hook_gateway('''
upstream "w" { "%s" }
route "POST /make" { handler = function(req)
  local res, err = mg.fetch("w", { path = "/items", method = "POST",
    headers = { ["X-Trace"] = req.id }, body = { name = "thing", tags = mg.json.array({}) } })
  return res.status, res.json
end }
''' % up.addr)
    r = request(g.port, "POST", "/make", body=b"")
    assert r.status == 201 and r.json() == {"ok": True}, r
    req = seen[0]
    assert req.method == "POST" and req.target == "/items"
    assert json.loads(req.body) == {"name": "thing", "tags": []}
    assert req.header("content-type") == "application/json"
    assert req.header("x-trace") == r.header("x-request-id")


# A backend document written by hand: key order, number spellings, a 20-digit integer and
# UTF-8 that decoding and encoding again would all change.
RAW_DOC = b'{"z":1,"a":1.50,"big":12345678901234567890,"s":"caf\xc3\xa9","e":1e2}'


def bytes_backend(routes):
    """An upstream answering GET PATH with the bytes ROUTES[PATH] as they are (not made by
    json.dumps), status 200, JSON content type; 404 otherwise; keep-alive."""

    def handler(conn):
        while True:
            req = conn.read_request(timeout=30)
            if req is None:
                return
            path = req.target.split("?")[0]
            if path in routes:
                conn.send(http_response(200, routes[path], {"Content-Type": "application/json"}))
            else:
                conn.send(http_response(404, b'{"error":"no"}'))

    return Upstream(handler)


def bytes_gateway(routes, config):
    """A gateway whose upstream "r" is bytes_backend(ROUTES), with the routes in CONFIG.
    Returns it and the upstream (kept by the caller while the test runs)."""
    up = bytes_backend(routes)
    return hook_gateway('upstream "r" { "%s" }\n' % up.addr + config), up


def aggregate_over(routes, calls):
    """bytes_gateway where GET /agg answers mg.aggregate { CALLS } (Lua text)."""
    return bytes_gateway(routes, 'route "GET /agg" { handler = function(req)\n'
                                 '  return mg.aggregate { %s }\nend }\n' % calls)


def test_nest_mode_passes_a_backend_document_through_byte_for_byte():
    # The backend's trailing newline is trimmed; everything inside is as the backend wrote it.
    g, _up = aggregate_over({"/doc": RAW_DOC + b"\r\n", "/list": b" [1, 2 ,3]\n"},
                            '{ "r", "/doc", key = "doc" }, { "r", "/list", key = "list" }')
    r = get(g, "/agg")
    assert r.status == 200, r
    assert r.header("x-moongate-completed") == "true"
    assert b'"doc":' + RAW_DOC in r.body, r.body
    assert b'"list":[1, 2 ,3]' in r.body, r.body
    assert b"\n" not in r.body and b"\r" not in r.body
    doc = r.json()
    assert doc == {"doc": json.loads(RAW_DOC), "list": [1, 2, 3]}
    assert doc["doc"]["big"] == 12345678901234567890 and doc["doc"]["s"] == "caf\u00e9"


def test_nest_mode_counts_a_body_that_is_not_json_as_a_failure():
    g, _up = aggregate_over(
        {"/ok": b'{"fine":true}', "/cut": b'{"a":', "/latin1": b'{"s":"caf\xe9"}'},
        '{ "r", "/ok", key = "ok" }, { "r", "/cut", key = "cut" }, '
        '{ "r", "/latin1", key = "latin1" }')
    r = get(g, "/agg")
    assert r.status == 200, r
    assert r.header("x-moongate-completed") == "false"
    # The answer is JSON (valid UTF-8) whatever the backends sent.
    doc = r.json()
    assert doc["ok"] == {"fine": True}
    assert doc["cut"] is None and doc["latin1"] is None
    errors = doc["_errors"]
    assert [e["backend"] for e in errors] == ["cut", "latin1"], errors
    assert all(e["error"].startswith("invalid JSON: parse error at byte") for e in errors), errors
    assert errors[0] == {"backend": "cut", "target": "r",
                         "error": "invalid JSON: parse error at byte 5: premature EOF"}
    assert errors[1]["error"] == \
        "invalid JSON: parse error at byte 11: invalid bytes in UTF8 string."


def test_a_transform_still_gets_the_decoded_table():
    g, _up = aggregate_over({"/doc": RAW_DOC}, '''
    { "r", "/doc", key = "t", transform = function(doc, res)
        return { kind = type(doc), a = doc.a, z1 = doc.z + 1, big = tostring(doc.big),
                 status = res.status }
      end },
    { "r", "/doc", key = "plain" },''')
    r = get(g, "/agg")
    assert r.status == 200 and r.header("x-moongate-completed") == "true", r
    doc = r.json()
    assert doc["t"] == {"kind": "table", "a": 1.5, "z1": 2, "big": "12345678901234567890",
                        "status": 200}
    # The call without a transform, in the same document, still passes through.
    assert b'"plain":' + RAW_DOC in r.body


def test_merge_mode_still_merges_decoded_objects():
    g, _up = aggregate_over({"/doc": RAW_DOC, "/more": b'{"z":2,"extra":[1.0]}'},
                            '{ "r", "/doc", key = "d" }, { "r", "/more", key = "m" }, '
                            'merge = "merge"')
    r = get(g, "/agg")
    assert r.status == 200 and r.header("x-moongate-completed") == "true", r
    assert r.json() == {"z": 2, "a": 1.5, "big": 12345678901234567890, "s": "caf\u00e9",
                        "e": 100, "extra": [1]}


def test_a_handler_can_answer_a_fetched_body_as_raw_json():
    g, _up = bytes_gateway({"/doc": RAW_DOC + b"\n", "/cut": b'{"a":'}, '''
route "GET /raw" { handler = function(req)
  local res = mg.fetch("r", "/doc")
  return 200, { a = mg.json.raw(res.body) }
end }
route "GET /raw-bad" { handler = function(req)
  local res = mg.fetch("r", "/cut")
  local v, err = mg.json.raw(res.body)
  return 200, { refused = v == nil, err = err }
end }
''')
    r = get(g, "/raw")
    assert r.status == 200, r
    assert r.body == b'{"a":' + RAW_DOC + b"}", r.body
    assert r.header("content-type").startswith("application/json")
    r = get(g, "/raw-bad")
    assert r.status == 200, r
    assert r.json() == {"refused": True, "err": "parse error at byte 5: premature EOF"}


def test_nest_mode_answers_json_when_a_backend_uses_form_feeds_as_whitespace():
    g, _up = aggregate_over({"/ff": b'\x0c{"a":\x0b1}', "/ok": b'{"fine":true}'},
                            '{ "r", "/ff", key = "ff" }, { "r", "/ok", key = "ok" }')
    r = get(g, "/agg")
    assert r.status == 200, r
    # yajl skips \f and \v between tokens; JSON does not, so they come out as spaces.
    assert b'"ff":{"a": 1}' in r.body, r.body
    assert r.json() == {"ff": {"a": 1}, "ok": {"fine": True}}
