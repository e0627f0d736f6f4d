#!/usr/bin/env python3
"""Opens N keep-alive connections to a proxy, sends one request on each, reads the whole
response, then holds every connection open and idle until SIGTERM/SIGINT.

    idle_clients.py PORT PATH N [CONCURRENCY]

Prints "ready ok=K failed=F" on stdout once all N exchanges are done (K connections are held),
and on SIGTERM prints "held ok=K closed_by_peer=C" and exits. bench.sh samples the proxy's RSS
between the two lines. Used by scripts/bench.sh for the idle-connection memory scenario.
"""
import errno
import resource
import selectors
import signal
import socket
import sys
import time

HOST = "127.0.0.1"


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 64
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


class Conn:
    __slots__ = ("sock", "state", "out", "buf", "need")

    def __init__(self, sock, req):
        self.sock = sock
        self.state = "connect"
        self.out = req
        self.buf = b""
        self.need = None  # set by response_complete once the head is parsed


def response_complete(c):
    """True once c.buf holds a whole response (Content-Length or chunked)."""
    if c.need is None:
        end = c.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        length = 0
        chunked = False
        for line in c.buf[:end].decode("latin-1").lower().split("\r\n")[1:]:
            name, _, value = line.partition(":")
            name = name.strip()
            if name == "content-length":
                length = int(value.strip())
            elif name == "transfer-encoding" and "chunked" in value:
                chunked = True
        # need >= 0: total length of head + body; need < 0: chunked, body starts at -need - 1.
        c.need = -(end + 4) - 1 if chunked else end + 4 + length
    if c.need >= 0:
        return len(c.buf) >= c.need
    return len(c.buf) > -c.need - 1 and c.buf.endswith(b"0\r\n\r\n")


def main():
    if len(sys.argv) < 4:
        sys.stderr.write(__doc__)
        return 2
    port = int(sys.argv[1])
    path = sys.argv[2]
    total = int(sys.argv[3])
    concurrency = int(sys.argv[4]) if len(sys.argv) > 4 else 200
    raise_nofile(total)
    req = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUser-Agent: moongate-bench-idle\r\n\r\n"
           % (path, port)).encode()

    sel = selectors.DefaultSelector()
    held = []
    failed = 0
    started = 0
    inflight = 0
    deadline = time.monotonic() + 120

    def start_one():
        nonlocal started, inflight, failed
        started += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex((HOST, port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            failed += 1
            return
        c = Conn(s, req)
        sel.register(s, selectors.EVENT_WRITE, c)
        inflight += 1

    def finish(c, ok):
        nonlocal inflight, failed
        sel.unregister(c.sock)
        inflight -= 1
        if ok:
            c.buf = b""
            c.out = b""
            held.append(c)
        else:
            c.sock.close()
            failed += 1

    while (started < total or inflight) and time.monotonic() < deadline:
        while started < total and inflight < concurrency:
            start_one()
        for key, _ in sel.select(timeout=1.0):
            c = key.data
            s = c.sock
            try:
                if c.state == "connect":
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        finish(c, False)
                        continue
                    c.state = "send"
                if c.state == "send":
                    n = s.send(c.out)
                    c.out = c.out[n:]
                    if not c.out:
                        c.state = "recv"
                        sel.modify(s, selectors.EVENT_READ, c)
                    continue
                data = s.recv(65536)
                if not data:
                    finish(c, False)
                    continue
                c.buf += data
                if response_complete(c):
                    finish(c, True)
            except (BlockingIOError, InterruptedError):
                pass
            except (OSError, ValueError):
                finish(c, False)
    failed += inflight + (total - started)

    print("ready ok=%d failed=%d" % (len(held), failed), flush=True)

    # Hold the connections; watch them so a peer close is counted, not silently ignored.
    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for c in held:
        sel.register(c.sock, selectors.EVENT_READ, c)
    closed = 0
    while not stop:
        try:
            events = sel.select(timeout=0.5)
        except InterruptedError:
            continue
        for key, _ in events:
            c = key.data
            try:
                data = c.sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(c.sock)
                c.sock.close()
                closed += 1
    print("held ok=%d closed_by_peer=%d" % (len(held) - closed, closed), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
