"""Upstream failure behaviour and the keep-alive pool, seen from both sides of the proxy.

Each test scripts an upstream (what it answers, when it resets or goes silent), sends real
requests through the gateway and asserts what the client gets back and how many upstream
connections were opened. The cases follow nginx's proxy_unfinished.t, proxy_extra_data.t and
proxy_keepalive.t (research/reliability-anchors.md §1.1 and §4): a failure the gateway saw
before any response byte is a JSON 502/504; a failure after it is a visibly truncated response
on a closed connection; an upstream connection is reused only after a clean exchange."""

import hashlib
import random
import socket
import threading
import time

import pytest

from mgtest import (Client, Gateway, Upstream, error_json, free_port, http_response,
                    parse_responses, raw, request)

HEAD_END = b"\r\n\r\n"


def proxy_config(targets, options=""):
    """A config with one upstream "u" of TARGETS (Lua expressions) behind the route "/*"."""
    return ('listen { port = {port}, host = "127.0.0.1" }\n'
            'upstream "u" { ' + ", ".join(targets) + options + ' }\n'
            'route "/*" { upstream = "u" }\n')


def target(port, host="127.0.0.1", weight=None):
    if weight is None:
        return '"%s:%d"' % (host, port)
    return '{ "%s:%d", weight = %d }' % (host, port, weight)


def fetch(port, path="/", method="GET", headers=None, version="HTTP/1.1", timeout=5.0):
    """One request on a fresh client connection that is kept open (no Connection: close), read
    until the gateway closes it or TIMEOUT passes. Returns (bytes, closed_by_gateway)."""
    c = Client(port, timeout=timeout)
    try:
        c.send_request(method, path, headers, None, version)
        closed = c.closed(timeout)
        return bytes(c.buf), closed
    finally:
        c.close()


def fetch_close(port, path="/", method="GET"):
    """One request with Connection: close; returns every byte the gateway sent back."""
    req = "%s %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % (method, path)
    return raw(port, req.encode(), timeout=5.0)


def strip_interim(data):
    """Drops leading 1xx response heads from DATA."""
    while data.startswith(b"HTTP/1.1 1") or data.startswith(b"HTTP/1.0 1"):
        data = data[data.index(HEAD_END) + 4:]
    return data


def serve_each(answer):
    """A handler that answers every request on a connection with ANSWER(req, index_on_conn)
    (bytes, or None to close the connection without answering)."""
    def handler(conn):
        i = 0
        while True:
            req = conn.read_request(timeout=5)
            if req is None:
                return
            data = answer(req, i)
            if data is None:
                return
            conn.send(data)
            i += 1
    return handler


OK_SECOND = http_response(200, b"second")


# ---------------------------------------------------------------------------------------------
# Failures before any response byte: JSON errors
# ---------------------------------------------------------------------------------------------

def test_refused_connection_is_a_json_502():
    dead = free_port()
    with Gateway(proxy_config([target(dead)], ', connect_timeout = "1s"')) as gw:
        r = request(gw.port, "GET", "/refused")
        assert r.status == 502
        doc = error_json(r)
        assert doc["status"] == 502
        assert r.header("x-request-id") == doc["request_id"]


def test_reset_before_any_response_byte_is_502():
    def handler(conn):
        if conn.read_request(timeout=5) is not None:
            conn.reset()
    with Upstream(handler) as up, Gateway(proxy_config([target(up.port)])) as gw:
        r = request(gw.port, "GET", "/reset")
        assert r.status == 502
        error_json(r)
        assert len(up.requests) >= 1


def test_silent_upstream_is_504_after_the_read_timeout():
    release = threading.Event()

    def handler(conn):
        if conn.read_request(timeout=5) is not None:
            release.wait(4)
    with Upstream(handler) as up, \
            Gateway(proxy_config([target(up.port)], ', timeout = "500ms"')) as gw:
        try:
            t0 = time.monotonic()
            r = request(gw.port, "GET", "/silent", timeout=5)
            elapsed = time.monotonic() - t0
        finally:
            release.set()
        assert r.status == 504
        error_json(r)
        assert 0.4 <= elapsed < 2.5, elapsed


def test_connect_timeout_is_504():
    # A listener with backlog 0 that never accepts: once its queue holds one connection, the
    # kernel drops further SYNs, so the gateway's connect hangs until its connect timeout.
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers = []
    try:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        port = lsock.getsockname()[1]
        blocked = False
        for _ in range(8):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            fillers.append(s)
            s.settimeout(0.2)
            try:
                s.connect(("127.0.0.1", port))
            except socket.timeout:
                blocked = True
                break
        assert blocked, "could not fill the accept queue of a backlog-0 listener"
        config = proxy_config([target(port)], ', connect_timeout = "300ms", timeout = "5s"')
        with Gateway(config) as gw:
            t0 = time.monotonic()
            r = request(gw.port, "GET", "/slow-connect", timeout=5)
            elapsed = time.monotonic() - t0
            assert r.status == 504
            error_json(r)
            assert 0.25 <= elapsed < 2.5, elapsed
    finally:
        for s in fillers:
            s.close()
        lsock.close()


# ---------------------------------------------------------------------------------------------
# Failures after the response started: truncated, never padded, connection closed
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["fin", "reset"])
def test_content_length_body_cut_short_reaches_the_client_truncated(how):
    def handler(conn):
        if conn.read_request(timeout=5) is None:
            return
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 300)
        time.sleep(0.3)  # let the gateway forward the head and the 300 bytes first
        conn.reset() if how == "reset" else conn.close()
    with Upstream(handler) as up, Gateway(proxy_config([target(up.port)])) as gw:
        data, closed = fetch(gw.port, "/cut")
        assert closed, "the gateway kept the client connection open after a truncated body"
        head, _, body = data.partition(HEAD_END)
        assert head.startswith(b"HTTP/1.1 200"), data[:200]
        if b"transfer-encoding: chunked" in head.lower():
            # Re-framed as chunked: the bytes are there, the terminating chunk is not.
            assert b"a" * 300 in body and not body.endswith(b"0\r\n\r\n"), body[-20:]
        else:
            assert b"content-length: 1000" in head.lower(), head
            assert body == b"a" * 300
        (resp,) = parse_responses(data)
        assert not resp.complete


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_chunked_body_cut_short_gets_no_terminating_chunk(how):
    def handler(conn):
        if conn.read_request(timeout=5) is None:
            return
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"100\r\n" + b"b" * 256 + b"\r\n")
        time.sleep(0.3)
        conn.reset() if how == "reset" else conn.close()
    with Upstream(handler) as up, Gateway(proxy_config([target(up.port)])) as gw:
        data, closed = fetch(gw.port, "/cut-chunked")
        assert closed, "the gateway kept the client connection open after a truncated body"
        head, _, body = data.partition(HEAD_END)
        assert head.startswith(b"HTTP/1.1 200"), data[:200]
        assert b"transfer-encoding: chunked" in head.lower()
        assert b"b" * 256 in body
        assert not body.endswith(b"0\r\n\r\n"), body[-20:]
        (resp,) = parse_responses(data)
        assert not resp.complete


# ---------------------------------------------------------------------------------------------
# Malformed upstream responses: 502, and the connection is never reused
# ---------------------------------------------------------------------------------------------

BAD_RESPONSES = {
    "duplicate-content-length":
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "content-length-and-chunked":
        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
    "obs-fold":
        b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "invalid-status-line":
        b"HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\nok",
    # A coding the gateway cannot undo would reach the client encoded without saying so.
    "gzip-transfer-coding":
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "switching-protocols-never-asked-for":
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_RESPONSES))
def test_malformed_response_is_502_and_the_connection_is_discarded(name):
    bad = BAD_RESPONSES[name]
    up = Upstream(serve_each(lambda req, i: bad if req.target == "/bad" else OK_SECOND))
    with up, Gateway(proxy_config([target(up.port)])) as gw:
        r = request(gw.port, "GET", "/bad")
        assert r.status == 502, r
        error_json(r)
        r2 = request(gw.port, "GET", "/after")
        assert r2.status == 200 and r2.body == b"second", r2
        assert up.connections == 2
        assert [q.target for q in up.requests] == ["/bad", "/after"]


@pytest.mark.parametrize("delayed", [False, True], ids=["same-packet", "while-idle"])
def test_bytes_after_a_complete_body_never_reach_the_client(delayed):
    def handler(conn):
        while True:
            req = conn.read_request(timeout=5)
            if req is None:
                return
            if req.target != "/extra":
                conn.send(OK_SECOND)
            elif delayed:
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                time.sleep(0.1)
                conn.send(b"EXTRA")
            else:
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA")
    with Upstream(handler) as up, Gateway(proxy_config([target(up.port)])) as gw:
        data = fetch_close(gw.port, "/extra")
        assert b"EXTRA" not in data
        (resp,) = parse_responses(data)
        # The contract allows either answer for the first request, but never the extra bytes.
        assert (resp.status, resp.body) in ((200, b"hello"), (502, resp.body)), resp
        if delayed:
            time.sleep(0.3)  # the junk arrives while the connection sits idle in the pool
        r2 = request(gw.port, "GET", "/next")
        assert r2.status == 200 and r2.body == b"second", r2
        assert up.connections == 2


BODYLESS = {
    "204": ("GET", b"HTTP/1.1 204 No Content\r\n\r\nhello"),
    "304": ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello"),
    "HEAD": ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
}


@pytest.mark.parametrize("name", sorted(BODYLESS))
def test_body_bytes_after_a_bodyless_answer_are_dropped(name):
    method, bad = BODYLESS[name]
    up = Upstream(serve_each(lambda req, i: bad if req.target == "/bodyless" else OK_SECOND))
    with up, Gateway(proxy_config([target(up.port)])) as gw:
        data = fetch_close(gw.port, "/bodyless", method)
        assert b"hello" not in data, data
        (resp,) = parse_responses(data, head_requests=(0,) if method == "HEAD" else ())
        assert resp.status in (int(name) if name.isdigit() else 200, 502), resp
        if resp.status != 502:
            assert data.endswith(HEAD_END), data  # the head and nothing after it
        r2 = request(gw.port, "GET", "/next")
        assert r2.status == 200 and r2.body == b"second", r2
        assert up.connections == 2


# ---------------------------------------------------------------------------------------------
# Keep-alive pool
# ---------------------------------------------------------------------------------------------

def test_sequential_requests_reuse_one_upstream_connection():
    with Upstream.fixed(body=b"pooled") as up, Gateway(proxy_config([target(up.port)])) as gw:
        for i in range(10):
            r = request(gw.port, "GET", "/pool/%d" % i)
            assert r.status == 200 and r.body == b"pooled", r
        assert len(up.requests) == 10
        assert up.connections == 1


def test_upstream_connection_close_is_honoured():
    with Upstream.fixed(body=b"once", keepalive=False) as up, \
            Gateway(proxy_config([target(up.port)])) as gw:
        for i in range(3):
            r = request(gw.port, "GET", "/close/%d" % i)
            assert r.status == 200 and r.body == b"once", r
        assert up.connections == 3


def test_keepalive_requests_caps_exchanges_per_upstream_connection():
    with Upstream.fixed(body=b"capped") as up, \
            Gateway(proxy_config([target(up.port)], ", keepalive_requests = 3")) as gw:
        for i in range(9):
            r = request(gw.port, "GET", "/cap/%d" % i)
            assert r.status == 200 and r.body == b"capped", r
        assert len(up.requests) == 9
        assert up.connections == 3


def _one_exchange_then_close(conn):
    """One exchange per connection, advertised as keep-alive; then close while idle."""
    if conn.read_request(timeout=5) is None:
        return
    conn.send(http_response(200, b"fresh"))
    time.sleep(0.05)


def test_idle_connection_closed_by_upstream_get_still_succeeds():
    with Upstream(_one_exchange_then_close) as up, Gateway(proxy_config([target(up.port)])) as gw:
        assert request(gw.port, "GET", "/one").status == 200
        time.sleep(0.3)
        r = request(gw.port, "GET", "/two")
        assert r.status == 200 and r.body == b"fresh", r
        assert up.connections == 2


def test_idle_connection_closed_by_upstream_post_is_never_replayed():
    with Upstream(_one_exchange_then_close) as up, Gateway(proxy_config([target(up.port)])) as gw:
        assert request(gw.port, "GET", "/one").status == 200
        time.sleep(0.3)
        r = request(gw.port, "POST", "/two", body=b"payload-1")
        posts = [q for q in up.requests if q.method == "POST"]
        assert r.status in (200, 502), r
        if r.status == 200:
            assert r.body == b"fresh"
            assert len(posts) == 1 and posts[0].body == b"payload-1"
        else:
            assert len(posts) <= 1


def test_reused_connection_dropped_before_answering_get_is_retried_once():
    # Every connection answers its first request and drops its second one unanswered.
    up = Upstream(serve_each(lambda req, i: http_response(200, b"ok-%d" % i) if i == 0 else None))
    with up, Gateway(proxy_config([target(up.port)])) as gw:
        assert request(gw.port, "GET", "/one").status == 200
        r = request(gw.port, "GET", "/two")
        assert r.status == 200 and r.body == b"ok-0", r
        assert up.connections == 2
        assert [q.target for q in up.requests] == ["/one", "/two", "/two"]


def test_reused_connection_dropped_before_answering_post_is_not_retried():
    up = Upstream(serve_each(lambda req, i: http_response(200, b"ok-%d" % i) if i == 0 else None))
    with up, Gateway(proxy_config([target(up.port)])) as gw:
        assert request(gw.port, "GET", "/one").status == 200
        r = request(gw.port, "POST", "/two", body=b"payload-2")
        assert r.status == 502, r
        error_json(r)
        posts = [q for q in up.requests if q.method == "POST"]
        assert len(posts) == 1 and posts[0].body == b"payload-2"


# ---------------------------------------------------------------------------------------------
# Balancing, ejection, DNS
# ---------------------------------------------------------------------------------------------

def test_weights_split_requests_smoothly():
    with Upstream.fixed(body=b"A") as a, Upstream.fixed(body=b"B") as b:
        config = proxy_config([target(a.port, weight=3), target(b.port, weight=1)])
        with Gateway(config) as gw:
            seq = []
            for i in range(40):
                r = request(gw.port, "GET", "/w/%d" % i)
                assert r.status == 200, r
                seq.append(r.body.decode())
        assert seq.count("A") == 30 and seq.count("B") == 10, "".join(seq)
        assert len(a.requests) == 30 and len(b.requests) == 10
        # Smooth: every window of four consecutive picks holds exactly one B (A A B A ...).
        for i in range(len(seq) - 3):
            assert seq[i:i + 4].count("B") == 1, "".join(seq)


def test_dead_target_is_ejected_after_max_fails():
    dead = free_port()
    with Upstream.fixed(body=b"live") as live:
        config = proxy_config([target(dead), target(live.port)],
                              ', max_fails = 2, fail_timeout = "30s", connect_timeout = "500ms"')
        with Gateway(config) as gw:
            statuses = []
            for i in range(20):
                r = request(gw.port, "GET", "/e/%d" % i)
                statuses.append(r.status)
                if r.status == 200:
                    assert r.body == b"live"
                else:
                    assert r.status == 502, r
            failures = [s for s in statuses if s != 200]
            assert len(failures) <= 2, statuses
            assert statuses[4:] == [200] * 16, statuses
            assert len(live.requests) == statuses.count(200)


def test_failing_target_is_ejected_for_fail_timeout_then_tried_again():
    # A target that resets every request: unlike a refused connect, each attempt is counted.
    def handler(conn):
        if conn.read_request(timeout=5) is not None:
            conn.reset()
    with Upstream.fixed(body=b"live") as live, Upstream(handler) as bad:
        config = proxy_config([target(bad.port), target(live.port)],
                              ', max_fails = 2, fail_timeout = "1s"')
        with Gateway(config) as gw:
            statuses = [request(gw.port, "GET", "/f/%d" % i).status for i in range(12)]
            assert set(statuses) <= {200, 502}, statuses
            assert statuses.count(502) <= 2, statuses
            assert statuses[4:] == [200] * 8, statuses
            assert bad.connections == 2, "tried %d times, max_fails = 2" % bad.connections
            time.sleep(1.2)
            for i in range(4):
                assert request(gw.port, "GET", "/g/%d" % i).status in (200, 502)
            assert bad.connections >= 3, "never tried again after fail_timeout"


def test_all_targets_dead_gives_502_then_503():
    d1, d2 = free_port(), free_port()
    config = proxy_config([target(d1), target(d2)],
                          ', max_fails = 1, fail_timeout = "30s", connect_timeout = "500ms"')
    with Gateway(config) as gw:
        resps = [request(gw.port, "GET", "/dead/%d" % i) for i in range(6)]
        statuses = [r.status for r in resps]
        assert statuses[0] == 502, statuses
        assert statuses[-3:] == [503, 503, 503], statuses
        first_503 = statuses.index(503)
        assert set(statuses[:first_503]) == {502}, statuses
        assert set(statuses[first_503:]) == {503}, statuses
        for r in resps:
            error_json(r)


def test_dns_name_target():
    with Upstream.fixed(body=b"by-name") as up, \
            Gateway(proxy_config([target(up.port, host="localhost")])) as gw:
        r = request(gw.port, "GET", "/dns")
        assert r.status == 200 and r.body == b"by-name", r
        assert len(up.requests) == 1


# ---------------------------------------------------------------------------------------------
# Bodies and framing
# ---------------------------------------------------------------------------------------------

BIG = 8 << 20


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_large_streamed_response_arrives_intact(framing):
    blob = random.Random(7).randbytes(BIG)
    digest = hashlib.sha256(blob).hexdigest()
    step = 64 << 10

    def handler(conn):
        while conn.read_request(timeout=5) is not None:
            if framing == "chunked":
                conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(0, BIG, step):
                    conn.send(b"%x\r\n" % step + blob[i:i + step] + b"\r\n")
                conn.send(b"0\r\n\r\n")
            else:
                conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG)
                for i in range(0, BIG, step):
                    conn.send(blob[i:i + step])
    with Upstream(handler) as up, Gateway(proxy_config([target(up.port)])) as gw:
        r = request(gw.port, "GET", "/big", timeout=20)
        assert r.status == 200
        assert len(r.body) == BIG
        assert hashlib.sha256(r.body).hexdigest() == digest


def test_chunked_upstream_response_to_an_http10_client_is_close_delimited():
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n")
    with Upstream(serve_each(lambda req, i: chunked)) as up, \
            Gateway(proxy_config([target(up.port)])) as gw:
        data, closed = fetch(gw.port, "/old", version="HTTP/1.0")
        assert closed, "an HTTP/1.0 client without keep-alive must see the connection closed"
        head, _, body = data.partition(HEAD_END)
        assert head.startswith(b"HTTP/1."), data[:100]
        assert b" 200 " in head.split(b"\r\n")[0]
        assert b"transfer-encoding" not in head.lower()
        assert body == b"hello world"
        for line in head.lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                assert int(line.split(b":")[1]) == 11


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
], ids=["100", "103"])
def test_interim_response_then_final_answer(interim):
    final = http_response(200, b"final")
    up = Upstream(serve_each(lambda req, i: interim + final))
    with up, Gateway(proxy_config([target(up.port)])) as gw:
        data = fetch_close(gw.port, "/interim")
        rest = strip_interim(data)
        (resp,) = parse_responses(rest)
        assert resp.status == 200 and resp.body == b"final", data
        r2 = request(gw.port, "GET", "/after")
        assert r2.status == 200 and r2.body == b"final", r2


def test_client_going_away_cancels_the_upstream_exchange():
    # An endless streamed answer: once the client hangs up, the gateway must drop the upstream
    # connection rather than keep reading (or buffering) a body nobody will get.
    gone = threading.Event()

    def handler(conn):
        if conn.read_request(timeout=5) is None:
            return
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            if not conn.send(b"400\r\n" + b"z" * 1024 + b"\r\n"):
                gone.set()
                return
            time.sleep(0.005)
    with Upstream(handler) as up, Gateway(proxy_config([target(up.port)])) as gw:
        c = Client(gw.port)
        c.send_request("GET", "/endless")
        got = c.read_some(timeout=3, n=8192)
        assert got.startswith(b"HTTP/1.1 200") and len(got) >= 8192, got[:100]
        c.close()
        assert gone.wait(2.5), "the upstream connection outlived the client by 2.5 s"
