"""The access log (one JSON line per request, secrets redacted, control bytes escaped) and the
error log's level filter, read back from the files the gateway writes."""

import datetime
import json
import re
import time

from mgtest import Gateway, Upstream, free_port, http_response, parse_responses, raw, request

FIELDS = ("time", "client", "method", "path", "route", "status", "bytes_in", "bytes_out",
          "upstream", "upstream_time", "total_time", "request_id", "user_agent")


def proxy_config(up_port, gateway_block=""):
    return (gateway_block +
            'listen { port = {port}, host = "127.0.0.1" }\n'
            'upstream "u" { "127.0.0.1:%d", connect_timeout = "1s", timeout = "2s" }\n'
            'route "GET /api/*" { upstream = "u" }\n'
            'route "GET /hello" { respond = { 200, "hello\\n" } }\n' % up_port)


def gateway_block(**extra):
    fields = ['pid_file = "{tmp}/moongate.pid"', 'error_log = "stderr"']
    if "access_log" not in extra:
        fields.append('access_log = "{tmp}/access.log"')
    fields += ['%s = %s' % kv for kv in extra.items()]
    return "gateway { " + ", ".join(fields) + " }\n"


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_log_bytes(gw, n, timeout=2.0):
    """The access log's bytes once it holds at least N lines (or after TIMEOUT)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(gw.access_log_path, "rb") as f:
                data = f.read()
        except OSError:
            data = b""
        if data.count(b"\n") >= n or time.monotonic() >= deadline:
            return data
        time.sleep(0.02)


def delayed_upstream(delay, body):
    def handler(conn):
        while conn.read_request(timeout=5) is not None:
            time.sleep(delay)
            conn.send(http_response(200, body))
    return Upstream(handler)


def test_one_json_line_per_request_with_every_field():
    with delayed_upstream(0.05, b"logged") as up, Gateway(proxy_config(up.port)) as gw:
        req = (b"GET /api/items?x=1 HTTP/1.1\r\nHost: t\r\nUser-Agent: mgtest/1\r\n"
               b"Connection: close\r\n\r\n")
        t_before = time.time()
        data = raw(gw.port, req, timeout=5)
        (resp,) = parse_responses(data)
        assert resp.status == 200 and resp.body == b"logged", resp
        ids = [resp.header("x-request-id")]
        for i in range(2):
            r = request(gw.port, "GET", "/api/more/%d" % i)
            assert r.status == 200
            ids.append(r.header("x-request-id"))
        t_done = time.monotonic()
        entries = gw.access_log(n=3, timeout=2)
        # Flushed at least every 100 ms, without waiting for the gateway to stop.
        assert len(entries) == 3 and time.monotonic() - t_done < 0.6, entries
        time.sleep(0.2)  # anything more than one line per request would show up by now
        entries = gw.access_log(n=3, timeout=0)
        assert len(entries) == 3, entries
        assert [e.get("request_id") for e in entries] == ids
        # The same id went upstream with the request.
        assert [q.header("x-request-id") for q in up.requests] == ids
        e = entries[0]
        missing = [k for k in FIELDS if k not in e]
        assert not missing, (missing, e)
        assert "authorization" not in e and "cookie" not in e, e
        if is_number(e["time"]):
            assert abs(e["time"] - t_before) < 60, e["time"]
        else:
            assert isinstance(e["time"], str), e["time"]
            when = datetime.datetime.fromisoformat(e["time"].replace("Z", "+00:00"))
            assert when.tzinfo is not None, e["time"]
            assert abs(when.timestamp() - t_before) < 60, e["time"]
        assert isinstance(e["client"], str) and re.fullmatch(r"127\.0\.0\.1:\d+", e["client"])
        assert e["method"] == "GET"
        assert e["path"] == "/api/items?x=1"
        assert e["route"] == "GET /api/*"
        assert e["status"] == 200 and is_number(e["status"])
        assert e["bytes_in"] == len(req) and is_number(e["bytes_in"])
        assert e["bytes_out"] == len(data) and is_number(e["bytes_out"])
        assert e["upstream"] == "127.0.0.1:%d" % up.port
        assert is_number(e["upstream_time"]) and is_number(e["total_time"])
        # Seconds, not milliseconds: the upstream took 50 ms to answer.
        assert 0.04 <= e["upstream_time"] < 2.0, e["upstream_time"]
        assert e["upstream_time"] <= e["total_time"] < 5.0, e
        assert e["user_agent"] == "mgtest/1"


def test_secrets_are_redacted_everywhere_in_the_logs():
    secrets = ["QSECRET-111", "TSECRET-222", "ASECRET-333", "CSECRET-444"]
    block = gateway_block(redact_query='{ "apikey", "token" }')
    with Upstream.fixed(body=b"ok") as up, Gateway(proxy_config(up.port, block)) as gw:
        r = request(gw.port, "GET", "/api/r?apikey=QSECRET-111&x=1&token=TSECRET-222",
                    headers={"Authorization": "Bearer ASECRET-333",
                             "Cookie": "session=CSECRET-444"})
        assert r.status == 200
        # Redaction is for the logs only: the upstream gets the request as sent.
        (seen,) = up.requests
        assert seen.target == "/api/r?apikey=QSECRET-111&x=1&token=TSECRET-222"
        assert seen.header("authorization") == "Bearer ASECRET-333"
        (e,) = gw.access_log(n=1, timeout=2)
        assert e["authorization"] == "[redacted]"
        assert e["cookie"] == "[redacted]"
        assert e["path"].startswith("/api/r?"), e["path"]
        assert "apikey=[redacted]" in e["path"] and "token=[redacted]" in e["path"], e["path"]
        assert "x=1" in e["path"]
        text = read_log_bytes(gw, 1).decode("utf-8", "replace")
        gw.stop()
        everything = text + gw.stderr_text()
        for s in secrets:
            assert s not in everything, s


def test_404_and_400_are_logged():
    with Gateway(proxy_config(free_port())) as gw:
        r = request(gw.port, "GET", "/nope")
        assert r.status == 404
        data = raw(gw.port, b"GET / HTTP/1.1\r\nHost: t\r\nNo Colon Here\r\n\r\n", timeout=3)
        (bad,) = parse_responses(data)
        assert bad.status == 400, bad
        entries = gw.access_log(n=2, timeout=2)
        assert [e.get("status") for e in entries] == [404, 400], entries
        nf, br = entries
        assert nf["method"] == "GET" and nf["path"] == "/nope"
        assert nf["route"] is None and nf["upstream"] is None
        assert nf["request_id"] == r.header("x-request-id")
        assert br["request_id"] == bad.header("x-request-id")


def test_control_bytes_and_quotes_are_escaped():
    requests = [
        # A valid request whose User-Agent holds a tab, a quote, a backslash and non-UTF-8.
        b'GET /hello HTTP/1.1\r\nHost: t\r\nUser-Agent: a\tb"c\\d\xff\xfe\r\n'
        b'Connection: close\r\n\r\n',
        # An escape sequence in the User-Agent (rejected, but still logged).
        b"GET /hello HTTP/1.1\r\nHost: t\r\nUser-Agent: x\x1b[31mred\r\nConnection: close\r\n\r\n",
        # A control byte in the target.
        b"GET /he\x01llo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ]
    with Gateway(proxy_config(free_port())) as gw:
        statuses = []
        for req in requests:
            (resp,) = parse_responses(raw(gw.port, req, timeout=3))
            statuses.append(resp.status)
        assert statuses[0] == 200
        assert statuses[1] == 400 and statuses[2] == 400, statuses
        data = read_log_bytes(gw, len(requests))
    lines = data.split(b"\n")
    assert lines[-1] == b"", "the log does not end with a newline"
    lines = lines[:-1]
    assert len(lines) == len(requests), lines
    for line in lines:
        assert not any(b < 0x20 for b in line), line
        json.loads(line.decode("utf-8"))  # strict UTF-8 and valid JSON, or this raises
    first = json.loads(lines[0].decode("utf-8"))
    assert first["user_agent"].startswith('a\tb"c\\d'), first["user_agent"]
    assert [json.loads(x)["status"] for x in lines] == statuses


def test_access_log_to_stdout():
    block = gateway_block(access_log='"stdout"')
    with Gateway(proxy_config(free_port(), block)) as gw:
        r = request(gw.port, "GET", "/hello")
        assert r.status == 200

        def entries():
            out = []
            for line in gw.stdout_text().splitlines():
                if line.strip():
                    out.append(json.loads(line))
            return out
        deadline = time.monotonic() + 2
        while not entries() and time.monotonic() < deadline:
            time.sleep(0.02)
        (e,) = entries()
        assert e["path"] == "/hello" and e["status"] == 200
        assert e["request_id"] == r.header("x-request-id")


LEVEL_TAG = re.compile(r"\[(debug|info|warn|error)\]")


def test_error_log_level_filters_lower_levels():
    dead = free_port()
    seen = {}
    for level in ("debug", "warn", "error"):
        block = gateway_block(error_log='"{tmp}/error.log"', log_level='"%s"' % level)
        gw = Gateway(proxy_config(dead, block))
        try:
            r = request(gw.port, "GET", "/api/refused")
            assert r.status == 502
            assert gw.stop() == 0
            with open(gw.tmp + "/error.log", "rb") as f:
                text = f.read().decode("utf-8", "replace")
        finally:
            if gw.proc.poll() is None:
                gw.kill()
        seen[level] = (set(LEVEL_TAG.findall(text)), text)
    debug_levels, debug_text = seen["debug"]
    assert debug_levels & {"debug", "info"}, debug_text
    assert "127.0.0.1:%d" % dead in debug_text, "the refused upstream is not in the error log"
    warn_levels, warn_text = seen["warn"]
    assert not warn_levels & {"debug", "info"}, warn_text
    error_levels, error_text = seen["error"]
    assert error_levels <= {"error"}, error_text
