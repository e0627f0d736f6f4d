#!/usr/bin/env python3
"""Reload latency for scripts/bench.sh: how long from asking a running proxy to reload until a
route that exists only in the new config answers 200.

    reload_latency.py write KIND TEMPLATE OUT ROUND
        Writes OUT from TEMPLATE (already rendered by bench.sh) with its @ROUTES@ placeholder
        replaced by 100 routes, plus GET /new/ROUND when ROUND > 0. KIND is moongate or nginx.

    reload_latency.py measure KIND TEMPLATE CONF PORT ROUNDS TIMEOUT_S (--cmd ARG... | --hup PID)
        For round 1..ROUNDS: checks that GET /new/ROUND answers 404, writes the config for that
        round to CONF (atomically: a temp file renamed over it), then starts the clock, runs the
        command (--cmd, not waited for before polling) or sends SIGHUP to PID (--hup), and polls
        GET /new/ROUND (a fresh connection each time, 1 ms apart) until it answers 200.
        Prints one line per round: "round N ms MS cmd_rc RC cmd_ms MS" (RC and its time are "-"
        with --hup), then "ok" or "fail REASON" as the last line. Stops at the first round that
        gets no 200 within TIMEOUT_S.
"""
import os
import signal
import socket
import subprocess
import sys
import time

NROUTES = 100


def routes(kind, rnd):
    """The route declarations of round rnd: 100 fixed routes, a quarter of them with a Lua
    access hook (moongate), and GET /new/rnd answering 200 from the config itself."""
    out = []
    for i in range(1, NROUTES + 1):
        if kind == "moongate":
            if i % 4 == 0:
                out.append('route "GET /api/r%d/*" { upstream = "origin", access = function(req) '
                           'if not req:header("x-api-key") then return 401, { error = "no key" } '
                           'end end }' % i)
            else:
                out.append('route "GET /api/r%d/*" { upstream = "origin" }' % i)
        else:
            out.append("location /api/r%d/ { proxy_pass http://o; }" % i)
    if rnd > 0:
        if kind == "moongate":
            out.append('route "GET /new/%d" { respond = { 200, { round = %d } } }' % (rnd, rnd))
        else:
            out.append("location = /new/%d { return 200 '{\"round\":%d}'; }" % (rnd, rnd))
    return "\n".join(out)


def write(kind, template, out, rnd):
    with open(template, encoding="utf-8") as f:
        text = f.read()
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text.replace("@ROUTES@", routes(kind, rnd)))
    os.rename(tmp, out)


def status_of(port, path):
    """One GET on a fresh connection -> the status code, or None if the connection failed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                       % path).encode())
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    parts = data.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1])


def measure(kind, template, conf, port, rounds, timeout, cmd, hup):
    for rnd in range(1, rounds + 1):
        path = "/new/%d" % rnd
        st = status_of(port, path)
        if st != 404:
            print("fail before reload %d, GET %s answered %s (want 404)" % (rnd, path, st))
            return 1
        write(kind, template, conf, rnd)
        proc = None
        t0 = time.monotonic()
        if cmd:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        else:
            os.kill(hup, signal.SIGHUP)
        deadline = t0 + timeout
        st = None
        t1 = None
        while time.monotonic() < deadline:
            st = status_of(port, path)
            if st == 200:
                t1 = time.monotonic()
                break
            time.sleep(0.001)
        cmd_rc, cmd_ms, cmd_err = "-", "-", ""
        if proc:
            try:
                _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                cmd_rc = str(proc.returncode)
                cmd_ms = "%.1f" % ((time.monotonic() - t0) * 1000)
                cmd_err = err.decode(errors="replace").strip().splitlines()
                cmd_err = cmd_err[-1] if cmd_err else ""
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                cmd_rc = "timeout"
        if t1 is None:
            why = "no 200 from GET %s within %g s of the %s (last answer: %s)" % (
                path, timeout, "reload command" if cmd else "SIGHUP", st)
            if cmd:
                why += "; the reload command exited with %s%s" % (
                    cmd_rc, (": " + cmd_err) if cmd_err else "")
            print("fail " + why)
            return 1
        print("round %d ms %.1f cmd_rc %s cmd_ms %s" % (rnd, (t1 - t0) * 1000, cmd_rc, cmd_ms))
        sys.stdout.flush()
        # Let the old generation (or nginx's old worker) wind down before the next round.
        time.sleep(0.3)
    print("ok")
    return 0


def main(argv):
    if len(argv) == 6 and argv[1] == "write":
        write(argv[2], argv[3], argv[4], int(argv[5]))
        return 0
    if len(argv) >= 10 and argv[1] == "measure":
        kind, template, conf = argv[2], argv[3], argv[4]
        port, rounds, timeout = int(argv[5]), int(argv[6]), float(argv[7])
        if argv[8] == "--cmd":
            return measure(kind, template, conf, port, rounds, timeout, argv[9:], None)
        if argv[8] == "--hup" and len(argv) == 10:
            return measure(kind, template, conf, port, rounds, timeout, None, int(argv[9]))
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
