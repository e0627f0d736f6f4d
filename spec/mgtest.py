"""Integration-test harness for moongate: both sides of the proxy, scripted.

The model is Varnish's VTest: a scripted upstream that receives a request, lets the test check
it and answers with any bytes; a raw client that can send any bytes; and the real gateway
binary between them, started from a Lua config text and always stopped by PID.

    from mgtest import free_port, Upstream, Gateway, raw, request, parse_responses, Response, Request

Everything binds to 127.0.0.1 and every wait is bounded by a deadline, so a broken gateway
makes a test fail, never hang.
"""

import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time

HOST = "127.0.0.1"
DEFAULT_BIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "build", "moongate")


def moongate_bin():
    """Path of the binary under test: $MOONGATE_BIN, else build/moongate in this checkout."""
    return os.environ.get("MOONGATE_BIN") or DEFAULT_BIN


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------

def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((HOST, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def wait_for(cond, timeout=2.0, interval=0.01):
    """Polls cond() until it returns a true value or timeout passes; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(interval)


def rss_kib(pid):
    """Resident set size of a process in KiB (VmRSS in /proc/<pid>/status), or None if gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pid_alive(pid):
    """True while /proc/<pid> exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _proc_stat(pid):
    """(ppid, pgrp) of a process from /proc/<pid>/stat, or None when it is gone."""
    try:
        with open("/proc/%s/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[2])


def _children(ppid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _proc_stat(d)
            if st and st[0] == ppid:
                out.append(int(d))
    return sorted(out)


def _group_members(pgrp):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _proc_stat(d)
            if st and st[1] == pgrp:
                out.append(int(d))
    return out


def _set_linger_rst(sock):
    """Makes the next close() send RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _split_head(buf):
    """Index just past the end of a message head (CRLFCRLF, or a bare-LF blank line), or -1."""
    i = buf.find(b"\r\n\r\n")
    j = buf.find(b"\n\n")
    cands = [x + 4 for x in (i,) if x >= 0] + [x + 2 for x in (j,) if x >= 0]
    return min(cands) if cands else -1


def _head_lines(head):
    text = head.decode("latin-1")
    lines = re.split(r"\r?\n", text)
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def _parse_fields(lines):
    fields = []
    for line in lines:
        if ":" in line:
            name, value = line.split(":", 1)
            fields.append((name, value.strip(" \t")))
        else:
            fields.append((line, ""))
    return fields


def _first(fields, name):
    name = name.lower()
    for k, v in fields:
        if k.lower() == name:
            return v
    return None


def _parse_chunked(buf, pos):
    """Parses a chunked body starting at pos. Returns (body, trailers, end) or None if incomplete.
    Raises ValueError on syntax that cannot be chunked framing."""
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        line = buf[pos:eol].split(b";", 1)[0].strip()
        if not line or not re.fullmatch(rb"[0-9a-fA-F]+", line):
            raise ValueError("bad chunk size line %r" % buf[pos:eol])
        size = int(line, 16)
        pos = eol + 2
        if size == 0:
            break
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos:pos + size]
        if buf[pos + size:pos + size + 2] != b"\r\n":
            raise ValueError("chunk data not followed by CRLF")
        pos += size + 2
    trailers = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        line = buf[pos:eol]
        pos = eol + 2
        if not line:
            return bytes(body), trailers, pos
        trailers += _parse_fields([line.decode("latin-1")])


# ---------------------------------------------------------------------------------------------
# Requests (what the upstream receives) and responses (what the client receives)
# ---------------------------------------------------------------------------------------------

class Request:
    """One request as an upstream received it. headers: list of (name, value) as received."""

    def __init__(self, method, target, version, headers, body, raw, chunked=False, trailers=()):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body
        self.raw = raw
        self.chunked = chunked
        self.trailers = list(trailers)

    def header(self, name):
        """Value of the first header with that name (case-insensitive), or None."""
        return _first(self.headers, name)

    def header_all(self, name):
        """Every value of that header, in order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def header_names(self):
        """Lower-case names of every header received."""
        return [k.lower() for k, _ in self.headers]

    def __repr__(self):
        return "Request(%s %s %s, %d headers, %d body bytes)" % (
            self.method, self.target, self.version, len(self.headers), len(self.body))


class Response:
    """One response. headers: dict with lower-case names, repeated headers joined with ", "."""

    def __init__(self, status, reason, version, header_list, body, complete=True, raw=b""):
        self.status = status
        self.reason = reason
        self.version = version
        self.header_list = header_list
        self.headers = {}
        for k, v in header_list:
            k = k.lower()
            self.headers[k] = self.headers[k] + ", " + v if k in self.headers else v
        self.body = body
        self.complete = complete
        self.raw = raw

    def header(self, name):
        return self.headers.get(name.lower())

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "Response(%s %s, headers=%r, body=%r%s)" % (
            self.status, self.reason, self.headers, self.body[:200],
            "" if self.complete else ", INCOMPLETE")


def _bodyless_status(status):
    return 100 <= status < 200 or status in (204, 304)


def parse_one_response(buf, head=False, eof=True):
    """Parses one response at the start of buf.

    Returns (Response, consumed) or None when more bytes are needed. With eof=True the stream is
    over: a close-delimited body ends at the end of buf and a truncated message comes back with
    complete=False. head=True: the response answers a HEAD request (no body)."""
    end = _split_head(buf)
    if end < 0:
        if eof and buf:
            return Response(0, "", "", [], b"", complete=False, raw=bytes(buf)), len(buf)
        return None
    lines = _head_lines(buf[:end])
    parts = lines[0].split(" ", 2) if lines else [""]
    version = parts[0]
    try:
        status = int(parts[1])
    except (IndexError, ValueError):
        status = 0
    reason = parts[2] if len(parts) > 2 else ""
    fields = _parse_fields(lines[1:])
    te = _first(fields, "transfer-encoding")
    cl = _first(fields, "content-length")
    if head or _bodyless_status(status):
        return Response(status, reason, version, fields, b"", True, bytes(buf[:end])), end
    if te is not None and "chunked" in te.lower():
        try:
            r = _parse_chunked(buf, end)
        except ValueError:
            r = None
            if eof:
                return (Response(status, reason, version, fields, bytes(buf[end:]), False,
                                 bytes(buf)), len(buf))
        if r is None:
            if eof:
                return (Response(status, reason, version, fields, bytes(buf[end:]), False,
                                 bytes(buf)), len(buf))
            return None
        body, trailers, stop = r
        resp = Response(status, reason, version, fields, body, True, bytes(buf[:stop]))
        resp.trailers = trailers
        return resp, stop
    if cl is not None:
        n = int(cl.split(",")[0].strip())
        if len(buf) - end < n:
            if eof:
                return (Response(status, reason, version, fields, bytes(buf[end:]), False,
                                 bytes(buf)), len(buf))
            return None
        return (Response(status, reason, version, fields, bytes(buf[end:end + n]), True,
                         bytes(buf[:end + n])), end + n)
    if not eof:
        return None
    return Response(status, reason, version, fields, bytes(buf[end:]), True, bytes(buf)), len(buf)


def parse_responses(data, head_requests=()):
    """Parses a byte stream of pipelined responses into a list of Response.

    head_requests: indexes of the requests (0-based, counting final responses only, 1xx
    interim responses do not advance the count) that were HEAD, whose responses have no body.
    1xx responses appear in the list as responses of their own. The last response has
    complete=False when the stream was truncated."""
    out = []
    pos = 0
    final_index = 0
    buf = bytes(data)
    while pos < len(buf):
        r = parse_one_response(buf[pos:], head=final_index in head_requests, eof=True)
        if r is None:
            break
        resp, used = r
        out.append(resp)
        pos += used
        if not resp.complete or used == 0:
            break
        if not (100 <= resp.status < 200):
            final_index += 1
    return out


# ---------------------------------------------------------------------------------------------
# Raw client side
# ---------------------------------------------------------------------------------------------

def connect(port, timeout=5.0):
    """A connected TCP socket to 127.0.0.1:port."""
    s = socket.create_connection((HOST, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _has_final(buf):
    """True when buf starts with zero or more 1xx responses and one complete final response."""
    pos = 0
    while True:
        r = parse_one_response(bytes(buf[pos:]), eof=False)
        if r is None:
            return False
        resp, used = r
        if resp.status >= 200:
            return True
        pos += used


def raw(port, data, timeout=2.0, half_close=False, read_until_close=True):
    """Sends data on a fresh connection and returns the bytes read back.

    read_until_close=True: read until the peer closes (FIN or RST) or timeout passes.
    read_until_close=False: return as soon as the bytes read form at least one complete,
    non-1xx response (or at close/timeout). half_close: shut down our write side after sending."""
    c = Client(port, timeout=timeout)
    try:
        if data:
            c.send(data)
        if half_close:
            c.sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + timeout
        while not c.eof:
            if not read_until_close and _has_final(c.buf):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            c._fill(left)
        return bytes(c.buf)
    finally:
        c.close()


class Client:
    """One client connection kept open across requests (keep-alive, pipelining, slow reads).

    Bytes read but not yet consumed stay in .buf; .eof is set once the peer closed (FIN or RST;
    .reset tells which)."""

    def __init__(self, port, timeout=5.0):
        self.port = port
        self.timeout = timeout
        self.sock = connect(port, timeout)
        self.buf = bytearray()
        self.eof = False
        self.reset = False

    def send(self, data):
        """Sends all bytes; returns False if the peer had closed the connection."""
        if isinstance(data, str):
            data = data.encode("latin-1")
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def send_request(self, method, path, headers=None, body=None, version="HTTP/1.1"):
        """Sends one request; adds Host (unless given) and Content-Length for a body."""
        hdrs = list(headers.items() if isinstance(headers, dict) else (headers or []))
        names = [k.lower() for k, _ in hdrs]
        if "host" not in names:
            hdrs.insert(0, ("Host", "localhost"))
        if isinstance(body, str):
            body = body.encode()
        if body is not None and "content-length" not in names and "transfer-encoding" not in names:
            hdrs.append(("Content-Length", str(len(body))))
        head = "%s %s %s\r\n" % (method, path, version)
        head += "".join("%s: %s\r\n" % (k, v) for k, v in hdrs) + "\r\n"
        return self.send(head.encode("latin-1") + (body or b""))

    def request(self, method, path, headers=None, body=None, version="HTTP/1.1", timeout=None):
        """Sends one request and reads its (final) response."""
        self.send_request(method, path, headers, body, version)
        return self.read_response(timeout=timeout, head=(method == "HEAD"))

    def _fill(self, timeout):
        """Reads once (waiting up to timeout). Returns the number of bytes read."""
        if self.eof:
            return 0
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not r:
            return 0
        try:
            chunk = self.sock.recv(1 << 18)
        except ConnectionResetError:
            self.eof = True
            self.reset = True
            return 0
        except socket.timeout:
            return 0
        if not chunk:
            self.eof = True
            return 0
        self.buf += chunk
        return len(chunk)

    def read_response(self, timeout=None, head=False, interim=False):
        """Reads one response from the connection. Skips 1xx responses unless interim=True.
        Returns None when the connection closed with nothing buffered, or on timeout with
        nothing complete (then .buf keeps what arrived)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            r = parse_one_response(self.buf, head=head, eof=self.eof)
            if r is not None:
                resp, used = r
                del self.buf[:used]
                if 100 <= resp.status < 200 and not interim:
                    continue
                return resp
            if self.eof:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._fill(left)

    def read_some(self, timeout=1.0, n=None):
        """Waits up to timeout for bytes (for n bytes in .buf if n is given); returns .buf."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            if n is None and self.buf:
                break
            if n is not None and len(self.buf) >= n:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._fill(left)
        return bytes(self.buf)

    def closed(self, timeout=1.0):
        """True when the peer closes within timeout (bytes that arrive meanwhile go to .buf)."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._fill(left)
        return True

    def read_until_close(self, timeout=2.0):
        """Reads until the peer closes or timeout; returns everything buffered."""
        self.closed(timeout)
        return bytes(self.buf)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def request(port, method, path, headers=None, body=None, timeout=5):
    """One request on a fresh connection through http.client; returns a Response.
    headers: dict or list of (name, value). Host is added by http.client unless given."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        hdrs = dict(headers.items() if isinstance(headers, dict) else (headers or []))
        if isinstance(body, str):
            body = body.encode()
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        version = "HTTP/1.1" if r.version == 11 else "HTTP/1.0"
        return Response(r.status, r.reason, version, list(r.getheaders()), data, True, b"")
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Scripted upstream
# ---------------------------------------------------------------------------------------------

def http_response(status=200, body=b"ok", headers=None, reason=None, chunked=False,
                  version="HTTP/1.1", close=False):
    """Bytes of a response framed with Content-Length (or chunked); headers: dict or list."""
    if isinstance(body, str):
        body = body.encode()
    hdrs = list(headers.items() if isinstance(headers, dict) else (headers or []))
    names = [k.lower() for k, _ in hdrs]
    if chunked:
        if "transfer-encoding" not in names:
            hdrs.append(("Transfer-Encoding", "chunked"))
        payload = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    else:
        if "content-length" not in names and not _bodyless_status(status):
            hdrs.append(("Content-Length", str(len(body))))
        payload = body
    if close and "connection" not in names:
        hdrs.append(("Connection", "close"))
    reason = reason if reason is not None else http.client.responses.get(status, "Status")
    head = "%s %d %s\r\n" % (version, status, reason)
    head += "".join("%s: %s\r\n" % (k, v) for k, v in hdrs) + "\r\n"
    return head.encode("latin-1") + payload


class UpConn:
    """One connection accepted by an Upstream, handed to the handler."""

    def __init__(self, upstream, sock, index):
        self.upstream = upstream
        self.sock = sock
        self.index = index
        self.buf = bytearray()
        self.eof = False
        self.timed_out = False
        self.partial = b""

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            self.timed_out = True
            return False
        try:
            r, _, _ = select.select([self.sock], [], [], left)
        except (OSError, ValueError):
            self.eof = True
            return False
        if not r:
            self.timed_out = True
            return False
        try:
            chunk = self.sock.recv(1 << 18)
        except OSError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def read_request(self, timeout=5):
        """Reads and records one request. Returns None on EOF or timeout (partial bytes of an
        unfinished request stay in .partial)."""
        deadline = time.monotonic() + timeout
        self.timed_out = False
        while True:
            end = _split_head(self.buf)
            if end >= 0:
                req = self._parse(end, deadline)
                if req is not None:
                    self.upstream._record(req)
                    return req
                if self.eof or self.timed_out:
                    self.partial = bytes(self.buf)
                    return None
                continue
            if self.eof or self.timed_out:
                self.partial = bytes(self.buf)
                return None
            self._fill(deadline)

    def _parse(self, end, deadline):
        """Parses a request whose head ends at end; reads the body. None if the stream ended."""
        lines = _head_lines(self.buf[:end])
        parts = lines[0].split(" ")
        method = parts[0]
        target = parts[1] if len(parts) > 1 else ""
        version = parts[2] if len(parts) > 2 else ""
        fields = _parse_fields(lines[1:])
        te = _first(fields, "transfer-encoding")
        cl = _first(fields, "content-length")
        while True:
            if te is not None and "chunked" in te.lower():
                try:
                    r = _parse_chunked(self.buf, end)
                except ValueError:
                    r = (bytes(self.buf[end:]), [], len(self.buf))
                if r is not None:
                    body, trailers, stop = r
                    raw = bytes(self.buf[:stop])
                    del self.buf[:stop]
                    return Request(method, target, version, fields, body, raw, True, trailers)
            else:
                n = int(cl.split(",")[0].strip()) if cl and cl.strip().isdigit() else 0
                if len(self.buf) >= end + n:
                    raw = bytes(self.buf[:end + n])
                    body = bytes(self.buf[end:end + n])
                    del self.buf[:end + n]
                    return Request(method, target, version, fields, body, raw)
            if not self._fill(deadline):
                return None

    def wait_head(self, timeout=5):
        """Waits until a whole request head is buffered, without consuming it (read_request
        then reads the request). Returns False on EOF or timeout."""
        deadline = time.monotonic() + timeout
        while _split_head(self.buf) < 0:
            if self.eof or not self._fill(deadline):
                return False
        return True

    def read_head(self, timeout=5):
        """Reads only up to the end of a request head, returning (Request without body, bytes
        of the body already buffered). For tests that stream or inspect bodies themselves."""
        deadline = time.monotonic() + timeout
        while _split_head(self.buf) < 0:
            if self.eof or not self._fill(deadline):
                return None, b""
        end = _split_head(self.buf)
        lines = _head_lines(self.buf[:end])
        parts = lines[0].split(" ")
        req = Request(parts[0], parts[1] if len(parts) > 1 else "",
                      parts[2] if len(parts) > 2 else "", _parse_fields(lines[1:]), b"",
                      bytes(self.buf[:end]))
        rest = bytes(self.buf[end:])
        del self.buf[:]
        self.upstream._record(req)
        return req, rest

    def recv(self, n=65536, timeout=5):
        """Raw bytes: what is buffered, else one read (b"" on EOF or timeout)."""
        if self.buf:
            out = bytes(self.buf[:n])
            del self.buf[:n]
            return out
        if self._fill(time.monotonic() + timeout):
            return self.recv(n, timeout)
        return b""

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def respond(self, status=200, body=b"ok", headers=None, **kw):
        """Sends a response built by http_response()."""
        return self.send(http_response(status, body, headers, **kw))

    def wait_closed(self, timeout=2.0):
        """True when the gateway closes this connection within timeout."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            if not self._fill(deadline) and self.timed_out:
                return self.eof
        return True

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def reset(self):
        """Closes with RST (SO_LINGER 0)."""
        try:
            _set_linger_rst(self.sock)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


_live_upstreams = []
_live_gateways = []
_started_gateways = []  # every Gateway started since the conftest last cleared it
_all_tmp_dirs = []      # temp dirs of every Gateway, removed at the end of the session


class Upstream:
    """A threaded TCP server on 127.0.0.1. handler(conn) runs per accepted connection in its
    own thread; the connection is closed when the handler returns."""

    def __init__(self, handler=None, port=None):
        self.handler = handler or self._fixed_handler(200, b"ok", None, True)
        self.requests = []
        self.connections = 0
        self.errors = []
        self.conns = []
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, port or 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.addr = "%s:%d" % (HOST, self.port)
        self._stopping = False
        self._threads = []
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept_thread.start()
        _live_upstreams.append(self)

    @classmethod
    def fixed(cls, status=200, body=b"ok", headers=None, keepalive=True, port=None):
        """An upstream that answers every request with the same CL-framed response."""
        return cls(cls._fixed_handler(status, body, headers, keepalive), port=port)

    @staticmethod
    def _fixed_handler(status, body, headers, keepalive):
        def handler(conn):
            while True:
                req = conn.read_request(timeout=30)
                if req is None:
                    return
                data = http_response(status, body, headers, close=not keepalive)
                if req.method == "HEAD":
                    data = data[:_split_head(data)]
                conn.send(data)
                if not keepalive:
                    return
        return handler

    @classmethod
    def echo(cls, port=None):
        """An upstream that answers every request with a JSON description of it:
        {"method", "target", "version", "headers": [[name, value], ...], "body"}."""
        def handler(conn):
            while True:
                req = conn.read_request(timeout=30)
                if req is None:
                    return
                doc = {"method": req.method, "target": req.target, "version": req.version,
                       "headers": [[k, v] for k, v in req.headers],
                       "body": req.body.decode("latin-1")}
                conn.respond(200, json.dumps(doc).encode(), {"Content-Type": "application/json"})
        return cls(handler, port=port)

    def _accept_loop(self):
        while not self._stopping:
            try:
                r, _, _ = select.select([self.sock], [], [], 0.05)
            except (OSError, ValueError):
                return
            if not r:
                continue
            try:
                s, _ = self.sock.accept()
            except OSError:
                continue
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
                conn = UpConn(self, s, self.connections - 1)
                self.conns.append(conn)
                self.cond.notify_all()
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _run(self, conn):
        try:
            self.handler(conn)
        except Exception as e:  # reported to the test through .errors
            if not self._stopping:
                self.errors.append(e)
        finally:
            conn.close()

    def _record(self, req):
        with self.lock:
            self.requests.append(req)
            self.cond.notify_all()

    def wait_requests(self, n, timeout=5.0):
        """Waits until n requests were received; returns the list (maybe shorter on timeout)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return list(self.requests)

    def wait_connections(self, n, timeout=5.0):
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.connections < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return self.connections

    def stop(self):
        if self._stopping:
            return
        self._stopping = True
        try:
            self.sock.close()
        except OSError:
            pass
        for c in list(self.conns):
            c.close()
        for t in self._threads + [self._accept_thread]:
            t.join(timeout=2)
        if self in _live_upstreams:
            _live_upstreams.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------------------------
# The gateway process
# ---------------------------------------------------------------------------------------------

class GatewayNotBuilt(Exception):
    pass


class Gateway:
    """The real binary started on a Lua config text (see the module doc of the test plan).

    "{port}" in the config becomes .port (a free port for the default listener), "{tmp}" the
    temp dir, and any "{name}" the keyword argument of that name. Without a `gateway {` block a
    default one is prepended (pid file in tmp, access log in {tmp}/access.log, errors to stderr)."""

    def __init__(self, config, workers=1, args=(), env=None, wait=True, **fmt):
        self.bin = moongate_bin()
        if not os.access(self.bin, os.X_OK):
            import pytest
            pytest.skip("moongate binary not built: %s" % self.bin)
        self.tmp = tempfile.mkdtemp(prefix="mgtest-")
        _all_tmp_dirs.append(self.tmp)
        self.port = free_port()
        self.workers = workers
        if not re.search(r"(^|\n)\s*gateway\s*\{", config):
            config = ('gateway { pid_file = "{tmp}/moongate.pid", '
                      'access_log = "{tmp}/access.log", error_log = "stderr" }\n') + config
        config = config.replace("{port}", str(self.port)).replace("{tmp}", self.tmp)
        for k, v in fmt.items():
            config = config.replace("{%s}" % k, str(v))
        self.config = config
        self.config_path = os.path.join(self.tmp, "gateway.lua")
        with open(self.config_path, "w") as f:
            f.write(config)
        self.access_log_path = os.path.join(self.tmp, "access.log")
        self.stdout_path = os.path.join(self.tmp, "stdout.txt")
        self.stderr_path = os.path.join(self.tmp, "stderr.txt")
        self.ports = self.listen_ports(config)
        e = dict(os.environ)
        e.update(env or {})
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        cmd = [self.bin, "-c", self.config_path, "-w", str(workers)] + list(args)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=self._err, env=e, cwd=self.tmp,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self._stopped = False
        self._known_pids = {self.pid}
        _live_gateways.append(self)
        _started_gateways.append(self)
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop(expect_clean=False)
                raise

    @staticmethod
    def listen_ports(config):
        """Every port a `listen`/`admin` block of the config names."""
        ports = []
        for m in re.finditer(r"\b(listen|admin)\b[^{]*\{([^}]*)\}", config):
            p = re.search(r"\bport\s*=\s*(\d+)", m.group(2))
            if p:
                ports.append(int(p.group(1)))
        return ports

    def wait_ready(self, timeout=10.0):
        """Waits until every listen port accepts a connection; fails if the process exits."""
        deadline = time.monotonic() + timeout
        pending = list(self.ports)
        while pending:
            if self.proc.poll() is not None:
                raise AssertionError("moongate exited with %s before listening:\n%s"
                                     % (self.proc.returncode, self.stderr_text()))
            p = pending[0]
            try:
                s = socket.create_connection((HOST, p), timeout=0.5)
                s.close()
                pending.pop(0)
                continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("moongate not listening on %s after %.0f s:\n%s"
                                     % (pending, timeout, self.stderr_text()))
            time.sleep(0.02)
        if self.workers:
            # The master may listen before its workers are up: wait for them too.
            wait_for(lambda: len(self.worker_pids()) >= self.workers, timeout=max(
                0.1, deadline - time.monotonic()))
        for w in self.worker_pids():
            self._known_pids.add(w)

    def worker_pids(self):
        """PIDs of the master's child processes, from /proc."""
        if self.proc.poll() is not None:
            return []
        pids = _children(self.pid)
        self._known_pids.update(pids)
        return pids

    def stderr_text(self):
        try:
            self._err.flush()
        except (OSError, ValueError):
            pass
        with open(self.stderr_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stdout_text(self):
        with open(self.stdout_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def access_log(self, n=1, timeout=1.0):
        """Parsed JSON lines of the access log; waits up to timeout for at least n lines."""
        def read():
            try:
                with open(self.access_log_path, "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            except OSError:
                return []
            out = []
            for line in text.splitlines():
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        out.append({"_unparsed": line})
            return out
        lines = read()
        deadline = time.monotonic() + timeout
        while len(lines) < n and time.monotonic() < deadline:
            time.sleep(0.02)
            lines = read()
        return lines

    def wait_exit(self, timeout=10.0):
        """Waits for the master to exit by itself; returns its exit code or None."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, sig):
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def kill(self):
        """SIGKILL to the master and every process of its group."""
        self._kill_group()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._finish()

    def _kill_group(self):
        pids = set(self._known_pids)
        if self.proc.poll() is None:
            pids.update(_children(self.pid))
        pids.update(_group_members(self.pid))
        for p in pids:
            st = _proc_stat(p)
            # Only processes still in the group we created (pgrp == master pid).
            if st is not None and (p == self.pid or st[1] == self.pid):
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass

    def stop(self, timeout=10, expect_clean=True):
        """SIGTERM to the master and wait; returns its exit code. A master that does not exit
        within timeout is killed and the test fails."""
        if self._stopped:
            return self.proc.returncode
        hung = False
        if self.proc.poll() is None:
            self.worker_pids()
            try:
                os.kill(self.pid, signal.SIGTERM)
            except OSError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                hung = True
        # Workers must not outlive the master; whatever is left of the group is killed.
        left = [p for p in _group_members(self.pid) if pid_alive(p)]
        self._kill_group()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._finish()
        # Under `make asan` a sanitizer report from any of the gateway's processes (a worker's
        # leak report at exit, a UBSan finding) fails the test that ran it.
        if expect_clean:
            err = self.stderr_text()
            for mark in ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:"):
                if mark in err:
                    raise AssertionError("sanitizer report from moongate:\n%s" % err[-6000:])
        if expect_clean and hung:
            raise AssertionError("moongate did not exit within %s s of SIGTERM:\n%s"
                                 % (timeout, self.stderr_text()))
        if expect_clean and left:
            raise AssertionError("processes %s outlived the moongate master" % left)
        return self.proc.returncode

    def _finish(self):
        self._stopped = True
        for f in (self._out, self._err):
            try:
                f.close()
            except OSError:
                pass
        if self in _live_gateways:
            _live_gateways.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.stop(expect_clean=exc_type is None)


def run_cli(args, timeout=10, env=None, cwd=None):
    """Runs the binary with arguments (e.g. ["check", "-c", path]); returns CompletedProcess
    with text stdout/stderr."""
    bin_ = moongate_bin()
    if not os.access(bin_, os.X_OK):
        import pytest
        pytest.skip("moongate binary not built: %s" % bin_)
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([bin_] + list(args), capture_output=True, text=True, timeout=timeout,
                          env=e, cwd=cwd, stdin=subprocess.DEVNULL)


def cleanup_all():
    """Stops every Gateway and Upstream still running (the conftest calls this after each
    test, so a failing test leaks nothing). Returns the number stopped."""
    n = 0
    for g in list(_live_gateways):
        try:
            g.stop(expect_clean=False)
        except Exception:
            g.kill()
        n += 1
    for u in list(_live_upstreams):
        u.stop()
        n += 1
    return n


def remove_tmp(path):
    shutil.rmtree(path, ignore_errors=True)


def error_json(resp):
    """Checks that resp is a gateway error (JSON body with error/status/request_id) and returns
    the parsed body."""
    assert resp.header("content-type") is not None and \
        resp.header("content-type").startswith("application/json"), resp
    doc = resp.json()
    assert doc.get("status") == resp.status, doc
    assert isinstance(doc.get("error"), str) and doc["error"], doc
    assert isinstance(doc.get("request_id"), str) and doc["request_id"], doc
    return doc


def assert_rejected(port, data, status, timeout=3.0, close=True):
    """Sends data on a fresh connection and checks the gateway's answer: exactly one response,
    with a status in `status` (an int or a tuple), a JSON error body, and (close=True)
    `Connection: close` and the connection closed. Returns the Response."""
    statuses = status if isinstance(status, (tuple, list, set, frozenset)) else (status,)
    c = Client(port, timeout)
    try:
        c.send(data)
        closed = None
        if close:
            closed = c.closed(timeout)
        else:
            deadline = time.monotonic() + timeout
            while not c.eof and not _has_final(c.buf) and time.monotonic() < deadline:
                c._fill(deadline - time.monotonic())
        rs = parse_responses(c.buf)
    finally:
        c.close()
    assert rs, "no response to %r (closed=%s)" % (data[:200], closed)
    r = rs[0]
    assert r.status in statuses, "expected %s for %r, got %r" % (statuses, data[:200], r)
    error_json(r)
    assert r.header("x-request-id"), r
    if close:
        assert "close" in (r.header("connection") or "").lower(), \
            "no Connection: close on %r" % r
        assert closed, "gateway kept the connection open after %r" % r
        assert len(rs) == 1, "more than one response: %r" % rs
    return r


def assert_serves(port, upstream=None, path="/after-check", timeout=5):
    """A follow-up request on a fresh connection gets a 2xx (and reaches upstream, if given):
    the worker survived whatever the test sent before."""
    r = request(port, "GET", path, timeout=timeout)
    assert 200 <= r.status < 300, "follow-up request failed: %r" % r
    if upstream is not None:
        assert upstream.wait_requests(1, timeout) and \
            upstream.requests[-1].target == path, upstream.requests
    return r


__all__ = ["assert_rejected", "assert_serves", "free_port", "Upstream", "UpConn", "Gateway", "raw", "request", "parse_responses",
           "parse_one_response", "Response", "Request", "Client", "connect", "http_response",
           "wait_for", "rss_kib", "pid_alive", "run_cli", "cleanup_all", "error_json",
           "moongate_bin", "HOST"]
