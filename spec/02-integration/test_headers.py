"""Headers through the real binary: hop-by-hop removal both ways (including fields named in
Connection), X-Forwarded-For/-Proto/-Host, X-Request-Id, Host policies, strip_prefix and
rewrite, and fixed responses."""

import json
import re

import pytest

from mgtest import Client, Gateway, Upstream, error_json, request

CONF = """
listen { port = {port} }
upstream "up" { "{up}" }
route "/static/*" { upstream = "up", strip_prefix = "/static" }
route "GET /u/:id" { upstream = "up", rewrite = "/v2/:id" }
route "/pass/*" { upstream = "up", host_header = "pass" }
route "/to-upstream/*" { upstream = "up", host_header = "upstream" }
route "/literal/*" { upstream = "up", host_header = "backend.internal" }
route "GET /hello" { respond = { 200, "hello\\n", { ["X-Demo"] = "1" } } }
route "GET /teapot" { respond = { 418, "short and stout" } }
route "GET /json" { respond = { 200, { id = 1, name = "demo", tags = { "a", "b" } } } }
route "/*" { upstream = "up" }
"""

@pytest.fixture
def up():
    with Upstream() as u:
        yield u


@pytest.fixture
def gw(up):
    with Gateway(CONF, up=up.addr) as g:
        yield g


def send(gw, head_lines, method="GET", path="/x", body=b""):
    """Sends a request with exactly these header lines (after the request line)."""
    c = Client(gw.port)
    data = ("%s %s HTTP/1.1\r\n" % (method, path)).encode()
    data += b"".join(l.encode("latin-1") + b"\r\n" for l in head_lines) + b"\r\n" + body
    c.send(data)
    r = c.read_response(timeout=3, head=(method == "HEAD"))
    c.close()
    assert r is not None, "no response"
    return r


def fields(req, name):
    """Every value of a header as the upstream got it, list elements split out."""
    out = []
    for v in req.header_all(name):
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


# ---------------------------------------------------------------------------------------------
# Hop-by-hop fields
# ---------------------------------------------------------------------------------------------

def test_hop_by_hop_request_fields_are_removed(gw, up):
    r = send(gw, ["Host: localhost", "Connection: keep-alive, X-Hop-A, x-hop-b",
                  "Keep-Alive: timeout=99", "Proxy-Connection: keep-alive", "TE: trailers",
                  "Trailer: X-T", "Upgrade: h2c", "X-Hop-A: 1", "X-Hop-B: 2", "X-Keep: 3"])
    assert r.status == 200
    req = up.requests[0]
    names = req.header_names()
    for h in ["keep-alive", "proxy-connection", "te", "trailer", "upgrade", "x-hop-a", "x-hop-b"]:
        assert h not in names, "%s reached the upstream: %r" % (h, req.headers)
    # The gateway may send its own Connection to the upstream, never the client's list.
    conn = (req.header("connection") or "").lower()
    assert "x-hop" not in conn and "upgrade" not in conn
    assert "timeout=99" not in req.raw.decode("latin-1")
    assert req.header("x-keep") == "3"


def test_hop_by_hop_response_fields_are_removed(gw):
    headers = [("Connection", "X-Up-Hop, keep-alive"), ("X-Up-Hop", "secret"),
               ("Keep-Alive", "timeout=99"), ("Proxy-Connection", "keep-alive"),
               ("Upgrade", "foo"), ("Trailer", "X-T"), ("X-Ok", "1")]
    with Upstream.fixed(200, b"body", headers) as u2, Gateway(CONF, up=u2.addr) as g:
        c = Client(g.port)
        r = c.request("GET", "/x")
        assert r is not None and r.status == 200 and r.body == b"body", r
        for h in ["x-up-hop", "proxy-connection", "upgrade", "trailer"]:
            assert h not in r.headers, "%s reached the client: %r" % (h, r.headers)
        assert r.header("keep-alive") != "timeout=99"
        assert "x-up-hop" not in (r.header("connection") or "").lower()
        assert r.header("x-ok") == "1"
        # The client connection is the gateway's: still open and usable.
        r = c.request("GET", "/y")
        assert r is not None and r.status == 200
        c.close()


def test_connection_cannot_strip_the_gateway_headers(gw, up):
    r = send(gw, ["Host: localhost",
                  "Connection: X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, X-Request-Id",
                  "X-Forwarded-For: 10.9.9.9"])
    assert r.status == 200
    req = up.requests[0]
    # The client's XFF went with its Connection list; the gateway's own entry is there.
    assert fields(req, "x-forwarded-for") == ["127.0.0.1"], req.headers
    assert req.header("x-forwarded-proto") == "http"
    assert req.header("x-forwarded-host") == "localhost"
    assert req.header("x-request-id") == r.header("x-request-id")


def test_request_body_is_reframed(gw, up):
    r = send(gw, ["Host: localhost", "Transfer-Encoding: chunked"], "POST", "/x",
             b"3\r\nabc\r\n0\r\n\r\n")
    assert r.status == 200
    req = up.requests[0]
    assert req.body == b"abc"
    te = fields(req, "transfer-encoding")
    assert (te == ["chunked"] and req.header("content-length") is None) or \
        (te == [] and req.header("content-length") == "3"), req.headers


# ---------------------------------------------------------------------------------------------
# X-Forwarded-* and X-Request-Id
# ---------------------------------------------------------------------------------------------

def test_xff_is_added(gw, up):
    send(gw, ["Host: localhost"])
    assert fields(up.requests[0], "x-forwarded-for") == ["127.0.0.1"]


def test_xff_appends_to_incoming(gw, up):
    send(gw, ["Host: localhost", "X-Forwarded-For: 1.1.1.1, 2.2.2.2", "X-Forwarded-For: 3.3.3.3"])
    assert fields(up.requests[0], "x-forwarded-for") == ["1.1.1.1", "2.2.2.2", "3.3.3.3",
                                                         "127.0.0.1"]


def test_xfp_and_xfh_are_set_not_trusted(gw, up):
    send(gw, ["Host: api.example.com:8443", "X-Forwarded-Proto: https",
              "X-Forwarded-Host: evil.example"])
    req = up.requests[0]
    assert req.header_all("x-forwarded-proto") == ["http"]
    assert req.header_all("x-forwarded-host") == ["api.example.com:8443"]


def test_request_id_on_response_and_upstream_and_unique(gw, up):
    ids = set()
    c = Client(gw.port)
    for i in range(5):
        r = c.request("GET", "/r%d" % i)
        assert r is not None and r.status == 200
        rid = r.header("x-request-id")
        assert rid and re.fullmatch(r"[\x21-\x7e]{8,128}", rid), rid
        assert up.requests[i].header_all("x-request-id") == [rid]
        ids.add(rid)
    c.close()
    assert len(ids) == 5, "request ids repeat: %r" % ids


def test_request_id_on_gateway_errors_and_fixed_responses(gw, up):
    r = request(gw.port, "GET", "/hello")
    assert r.header("x-request-id")
    r = send(gw, ["Host: localhost", "X-A: a\x01"])
    assert r.status == 400
    assert error_json(r)["request_id"] == r.header("x-request-id")


def test_client_request_id_cannot_duplicate_the_header(gw, up):
    r = send(gw, ["Host: localhost", "X-Request-Id: client-chosen-id"])
    assert r.status == 200
    assert len(up.requests[0].header_all("x-request-id")) == 1
    assert len(r.header("x-request-id").split(",")) == 1


# ---------------------------------------------------------------------------------------------
# Host policies, strip_prefix, rewrite
# ---------------------------------------------------------------------------------------------

def test_host_header_pass(gw, up):
    send(gw, ["Host: client.example:8080"], path="/pass/a")
    assert up.requests[0].header_all("host") == ["client.example:8080"]


def test_host_header_upstream(gw, up):
    send(gw, ["Host: client.example"], path="/to-upstream/a")
    assert up.requests[0].header_all("host") == [up.addr]


def test_host_header_literal(gw, up):
    send(gw, ["Host: client.example"], path="/literal/a")
    assert up.requests[0].header_all("host") == ["backend.internal"]
    # X-Forwarded-Host still says what the client asked for.
    assert up.requests[0].header("x-forwarded-host") == "client.example"


@pytest.mark.parametrize("path,target", [
    ("/static/css/a.css", "/css/a.css"),
    ("/static/css/a.css?v=1&x=%2F", "/css/a.css?v=1&x=%2F"),
    ("/static/", "/"),
    ("/static", "/"),
])
def test_strip_prefix(gw, up, path, target):
    r = send(gw, ["Host: localhost"], path=path)
    assert r.status == 200
    assert [q.target for q in up.requests] == [target]


@pytest.mark.parametrize("path,target", [("/u/42", "/v2/42"), ("/u/42?x=1", "/v2/42?x=1"),
                                         ("/u/%61b", "/v2/ab")])
def test_rewrite(gw, up, path, target):
    r = send(gw, ["Host: localhost"], path=path)
    assert r.status == 200
    assert [q.target for q in up.requests] == [target]


# ---------------------------------------------------------------------------------------------
# Fixed responses
# ---------------------------------------------------------------------------------------------

def test_fixed_response_text(gw, up):
    c = Client(gw.port)
    r = c.request("GET", "/hello")
    assert r.status == 200 and r.body == b"hello\n"
    assert r.header("x-demo") == "1"
    assert r.header("content-length") == "6"
    assert r.header("x-request-id")
    # HEAD is not routed here (GET only), but the connection stays usable after the answer.
    r = c.request("GET", "/hello")
    assert r is not None and r.body == b"hello\n"
    c.close()
    assert up.requests == []


def test_fixed_response_status(gw, up):
    r = request(gw.port, "GET", "/teapot")
    assert r.status == 418 and r.body == b"short and stout"


def test_fixed_response_table_is_json(gw, up):
    r = request(gw.port, "GET", "/json")
    assert r.status == 200
    assert r.header("content-type").startswith("application/json")
    assert json.loads(r.body) == {"id": 1, "name": "demo", "tags": ["a", "b"]}


def test_upstream_response_headers_pass_through(gw):
    hdrs = [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Multi", "x"), ("Cache-Control",
                                                                             "no-store")]
    with Upstream.fixed(201, b"made", hdrs) as u2, Gateway(CONF, up=u2.addr) as g:
        c = Client(g.port)
        r = c.request("POST", "/things", body=b"{}")
        c.close()
        assert r.status == 201 and r.body == b"made"
        assert [v for k, v in r.header_list if k.lower() == "set-cookie"] == ["a=1", "b=2"]
        assert r.header("cache-control") == "no-store"
        assert r.header("x-request-id")
