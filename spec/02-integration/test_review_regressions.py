"""Regression specs for the defects a code review of the HTTP engine found (2026-11-27).

Each test reproduces one defect the way it was confirmed, and asserts what a user must see
instead. Under `make asan` the use-after-free cases also fail through the sanitizer check in
Gateway.stop()."""
import socket
import threading
import time

from mgtest import Client, Gateway, Upstream, error_json, raw

PROXY = """
limits { header_timeout = "2s", body_timeout = "2s" }
listen { port = {port} }
upstream "up" { "{up}", connect_timeout = "5s" }
route "/*" { upstream = "up" }
"""


def _listener(backlog):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(backlog)
    return s


def _read_head(conn, timeout=3.0):
    conn.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def _fill_accept_queue(port, n=3):
    """Connections nobody accepts: once the queue is full, new SYNs are dropped, so a connect
    to PORT stalls (until a retransmit after the queue drains)."""
    socks = []
    for _ in range(n):
        d = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        d.setblocking(False)
        d.connect_ex(("127.0.0.1", port))
        socks.append(d)
    time.sleep(0.2)
    return socks


def test_retried_request_never_sends_body_bytes_before_its_head():
    """A PUT whose pooled connection drops before any answer is retried on a fresh
    connection. The client's body arrives while that connect is still in flight; it must
    follow the rebuilt head, never precede it (bytes before the head are a smuggled request)."""
    ls = _listener(1)
    port = ls.getsockname()[1]
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    try:
        with Gateway(PROXY, up="127.0.0.1:%d" % port) as gw:
            c1 = Client(gw.port)
            c1.send(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n")
            pooled, _ = ls.accept()
            _read_head(pooled)
            pooled.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            assert c1.read_response(timeout=3).status == 200
            time.sleep(0.2)
            dummies = _fill_accept_queue(port)
            c2 = Client(gw.port)
            c2.send(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(smuggled))
            assert _read_head(pooled).startswith(b"PUT /x ")
            pooled.close()                    # dropped before answering: the gateway retries
            time.sleep(0.3)
            c2.send(smuggled)                 # the body arrives while the retry connects
            time.sleep(0.2)
            ls.settimeout(0.5)
            for _ in range(3):                # drain the queue: the SYN retransmit gets in
                try:
                    s, _ = ls.accept()
                    s.close()
                except socket.timeout:
                    break
            for d in dummies:
                d.close()
            ls.settimeout(5)
            retry, _ = ls.accept()
            head = _read_head(retry)
            assert head.startswith(b"PUT /x HTTP/1.1\r\n"), head[:200]
            body = head.split(b"\r\n\r\n", 1)[1]
            retry.settimeout(2)
            while len(body) < len(smuggled):
                chunk = retry.recv(65536)
                if not chunk:
                    break
                body += chunk
            assert body == smuggled           # the body, as a body, after the head
            retry.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
            assert c2.read_response(timeout=3).status == 201
            retry.close()
    finally:
        ls.close()


def test_a_long_host_header_is_served():
    """A Host of a few KB used to move the head buffer while pointers into it were live."""
    with Upstream.echo() as up, Gateway(PROXY, up=up.addr) as gw:
        host = b"h" * 5000
        out = raw(gw.port, b"GET /a HTTP/1.1\r\nHost: " + host + b"\r\nUser-Agent: ua\r\n\r\n",
                  timeout=3)
        assert out.startswith(b"HTTP/1.1 200 "), out[:200]
        assert up.requests[0].header("host") == host.decode()
        assert up.requests[0].header("user-agent") == "ua"


def test_large_trailers_are_dropped_and_the_request_logged_intact():
    """Trailers of several KB used to grow the head buffer after its pointers were fixed."""
    with Upstream.echo() as up, Gateway(PROXY, up=up.addr) as gw:
        c = Client(gw.port)
        c.send(b"POST /trail?q=1 HTTP/1.1\r\nHost: localhost\r\nUser-Agent: ua-test\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: "
               + b"t" * 8000 + b"\r\n\r\n")
        r = c.read_response(timeout=3)
        assert r is not None and r.status == 200, r
        assert up.requests[0].body == b"hello"
        assert up.requests[0].header("x-trailer") is None
        line = gw.access_log(1)[0]
        assert line["path"] == "/trail?q=1" and line["user_agent"] == "ua-test"


def test_content_length_beyond_2_63_is_rejected():
    """llhttp accepts lengths up to 2^64-1; taken as signed they became 'no body' and the
    body's bytes were then parsed as the next request."""
    with Upstream.echo() as up, Gateway(PROXY, up=up.addr) as gw:
        out = raw(gw.port, b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551615"
                  b"\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\n\r\n", timeout=3)
        assert out.startswith(b"HTTP/1.1 400 "), out[:200]
        assert out.count(b"HTTP/1.1 ") == 1
        assert up.requests == []


def test_100_continue_never_lands_inside_a_response():
    """An upstream that answers early while the client's body is still streaming: the
    gateway must not send `100 Continue` once the final response has started."""
    ls = _listener(8)
    port = ls.getsockname()[1]
    size = 4 << 20
    done = threading.Event()

    def upstream():
        s, _ = ls.accept()
        head = _read_head(s)
        got = len(head) - head.index(b"\r\n\r\n") - 4
        s.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nearly\r\n")
        time.sleep(0.5)                        # not reading: the client's body is held back
        s.settimeout(5)
        while got < size:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        s.sendall(b"0\r\n\r\n")
        done.wait(5)
        s.close()

    config = PROXY.replace('limits { header_timeout = "2s", body_timeout = "2s" }',
                           'limits { header_timeout = "2s", body_timeout = "5s", body_bytes = "64m" }')
    try:
        with Gateway(config, up="127.0.0.1:%d" % port) as gw:
            t = threading.Thread(target=upstream, daemon=True)
            t.start()
            c = socket.create_connection(("127.0.0.1", gw.port))
            c.settimeout(10)
            c.sendall(b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                      b"Content-Length: %d\r\n\r\n" % size)
            out = b""
            while b"early" not in out:         # the 100, then the early answer's head
                out += c.recv(65536)
            sender = threading.Thread(target=lambda: c.sendall(b"z" * size), daemon=True)
            sender.start()
            while not out.endswith(b"0\r\n\r\n"):
                chunk = c.recv(65536)
                if not chunk:
                    break
                out += chunk
            done.set()
            assert out.count(b"100 Continue") <= 1
            final = out.index(b"HTTP/1.1 200 ")
            assert b"100 Continue" not in out[final:], out[:400]
            c.close()
    finally:
        done.set()
        ls.close()


def test_half_closed_request_with_a_complete_body_is_answered():
    """The whole request, then FIN, while no pooled connection exists: the body is still in
    the gateway's buffer when EOF arrives, and the request must be proxied and answered."""
    with Upstream.fixed(keepalive=False) as up, Gateway(PROXY, up=up.addr) as gw:
        out = raw(gw.port, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
                  timeout=3, half_close=True)
        assert out.startswith(b"HTTP/1.1 200 "), out[:200]
        assert [q.body for q in up.requests] == [b"hello"]


def test_upstream_read_timeout_does_not_run_while_the_client_uploads():
    """A client slower than the upstream's read timeout but within its own body timeout must
    not get a 504 that blames the upstream."""
    config = PROXY.replace('"{up}", connect_timeout = "5s"', '"{up}", timeout = "300ms"')
    with Upstream.echo() as up, Gateway(config, up=up.addr) as gw:
        c = Client(gw.port)
        c.send(b"POST /slow HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nab")
        for piece in (b"cd", b"ef"):
            time.sleep(0.4)
            c.send(piece)
        r = c.read_response(timeout=3)
        assert r is not None and r.status == 200, r
        assert up.requests[0].body == b"abcdef"
