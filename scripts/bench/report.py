#!/usr/bin/env python3
"""Helpers for scripts/bench.sh.

    report.py parse-wrk FILE
        Prints "requests rps p50_ms p99_ms errors" from a `wrk --latency` output
        (errors = non-2xx/3xx responses + socket errors); "0 0 0 0 -1" when unreadable.

    report.py check-agg FILE
        Prints "ok" when FILE holds the merged document of the aggregation scenario (user,
        orders and reviews as the origin serves them), else what is wrong.

    report.py render DIR
        Renders DIR/meta.env, DIR/status.tsv, DIR/runs.tsv, DIR/mem.tsv, DIR/lua-status.tsv and
        DIR/reload.tsv (written by bench.sh) as a Markdown report on stdout.
"""
import json
import os
import re
import statistics
import sys

TARGETS = ["direct", "nginx", "haproxy", "moongate"]
LABELS = {
    "direct": "direct (wrk → origin)",
    "nginx": "nginx `proxy_pass`",
    "haproxy": "HAProxy",
    "moongate": "moongate",
}
SCENARIOS = [("12", "12-byte response (`hello world\\n`)"), ("1k", "1 KiB response")]
# The Lua scenarios: moongate against nginx + lua-nginx-module doing the same work.
LUA_TARGETS = ["nginx-lua", "moongate"]
LUA_LABELS = {"nginx-lua": "nginx + Lua", "moongate": "moongate"}
LUA_SCENARIOS = [
    ("apikey", "API key + counter (`GET /a`)",
     "The access hook looks up `X-Api-Key` in a table of 100 keys (401 JSON if absent or "
     "unknown), counts the request per key in a shared dictionary (`mg.shared` / "
     "`lua_shared_dict`), then the request is proxied to the origin (1 KiB answer) with the "
     "headers moongate adds (`X-Forwarded-For`, `-Proto`, `-Host`, `X-Request-Id`; nginx: "
     "`proxy_set_header`, `$request_id`). wrk cycles through the 100 keys.",
     1.2, 0.8),
    ("agg", "Aggregation of three JSON backends (`GET /b`)",
     "One request fetches `/users/1`, `/orders/1` and `/reviews/1` (JSON, 281–338 bytes) from "
     "the origin in parallel and answers one JSON document with each under its key: "
     "`mg.aggregate` in a handler (each body checked as JSON and passed through, see "
     "`mg.json.raw`) / `ngx.location.capture_multi` to three `proxy_pass` locations, each body "
     "decoded with lua-cjson, one table encoded.",
     1.5, None),
    ("aggtables", "Aggregation built by hand in Lua tables (`GET /b2`)",
     "The same document made the way the nginx + Lua config makes it: `mg.fetch_all`, each "
     "body decoded into Lua tables (`res.json`), one table of them encoded (nginx + Lua: the "
     "same work as `GET /b`). No target: it shows what the table path costs.",
     None, None),
]
RELOAD_TARGET_MS = 100.0
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def to_ms(text):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        return None
    return float(m.group(1)) * UNIT_MS[m.group(2)]


def parse_wrk(path):
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    req = re.search(r"^\s*(\d+) requests in", text, re.M)
    rps = re.search(r"^Requests/sec:\s*([0-9.]+)", text, re.M)
    lat = {}
    for pct, val in re.findall(r"^\s*(50|99)%\s+(\S+)", text, re.M):
        lat[pct] = to_ms(val)
    if not req or not rps or lat.get("50") is None or lat.get("99") is None:
        return None
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errors += sum(int(x) for x in m.groups())
    return int(req.group(1)), float(rps.group(1)), lat["50"], lat["99"], errors


def read_tsv(path):
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line:
                    rows.append(line.split("\t"))
    except OSError:
        pass
    return rows


def read_meta(path):
    meta = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                k, _, v = line.rstrip("\n").partition("=")
                meta[k] = v
    except OSError:
        pass
    return meta


DISTURBED = 0.10


def disturbed(r, target):
    """True when other processes took >= DISTURBED of the proxy's CPU (proxy runs) or of the
    wrk + origin CPU during run r."""
    if len(r) < 12 or int(r[10]) <= 0:
        return False
    wall = int(r[10])
    if target != "direct" and int(r[9]) / wall >= DISTURBED:
        return True
    return int(r[11]) / wall >= DISTURBED


def fmt_int(x):
    return "{:,}".format(int(round(x)))


def fmt_ms(x):
    if x < 1:
        return "%.0f µs" % (x * 1000)
    if x < 10:
        return "%.2f ms" % x
    return "%.1f ms" % x


def fmt_ratio(x, base):
    if x is None or not base:
        return "—"
    return "%.2f×" % (x / base)


def check_agg(path):
    """"ok" when path holds the aggregation scenario's merged document, else what is wrong."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        return "unreadable: %s" % e
    try:
        d = json.loads(text)
    except ValueError:
        return "not JSON: %r" % text[:120]
    try:
        if (d["user"]["id"] == 1 and d["user"]["address"]["city"] == "London"
                and d["orders"]["count"] == 4 and len(d["orders"]["orders"]) == 4
                and d["reviews"]["average"] == 4.25 and len(d["reviews"]["reviews"]) == 4):
            return "ok"
    except (KeyError, TypeError):
        pass
    return "not the merged document: %r" % text[:120]


def scenario_stats(runs, scen, targets, labels, meta, clk, notes):
    """Median figures per target of scenario scen -> (med, used): med[t] is a dict (rps, min,
    max, p50, p99 in ms, cpu in µs/req) or None, used[t] the runs it comes from. Adds notes on
    runs without a result, runs left out, wrk errors and other processes' load."""
    med = {}
    used = {}
    for t in targets:
        rs = [r for r in runs if len(r) >= 9 and r[0] == scen and r[1] == t]
        good = [r for r in rs if int(r[3]) > 0]
        if not good:
            med[t] = None
            continue
        if len(good) < len(rs):
            notes.append("%s / %s: %d of %d runs produced no wrk result."
                         % (labels[t], scen, len(rs) - len(good), len(rs)))
        # Runs that other work on the machine disturbed (>= DISTURBED of a CPU) are left out
        # when at least one undisturbed run remains; the raw runs are in latest-runs.tsv.
        clean = [r for r in good if not disturbed(r, t)]
        if clean and len(clean) < len(good):
            notes.append("%s / %s: %d of %d runs left out: other processes took ≥%.0f%% of "
                         "a CPU during them." % (labels[t], scen, len(good) - len(clean),
                                                 len(good), DISTURBED * 100))
            good = clean
        used[t] = good
        rps = [float(r[4]) for r in good]
        cpu = [int(r[8]) * 1e6 / clk / int(r[3]) for r in good if r[8] != "-"]
        errs = sum(int(r[7]) for r in good)
        if errs:
            notes.append("%s / %s: wrk counted %d errors (non-2xx or socket errors) over "
                         "the rounds." % (labels[t], scen, errs))
        # Ticks other processes (not the proxy, origin or wrk) took on the two CPUs.
        busy = [(int(r[9]), int(r[11]), int(r[10])) for r in good
                if len(r) >= 12 and int(r[10]) > 0]
        if busy:
            wall = sum(b[2] for b in busy)
            shares = []
            if t != "direct":
                shares.append((sum(b[0] for b in busy) / wall, meta.get("cpu_proxy", "0"),
                               "proxy"))
            shares.append((sum(b[1] for b in busy) / wall, meta.get("cpu_load", "1"),
                           "wrk + origin"))
            hit = ["%.0f%% of CPU %s (%s)" % (x * 100, cpu, who)
                   for x, cpu, who in shares if x >= 0.05]
            if hit:
                notes.append("%s / %s: other processes on this machine took %s during "
                             "these runs; req/s and latency are disturbed (CPU per request "
                             "less so)." % (labels[t], scen, " and ".join(hit)))
        med[t] = {
            "rps": statistics.median(rps), "min": min(rps), "max": max(rps),
            "p50": statistics.median(float(r[5]) for r in good),
            "p99": statistics.median(float(r[6]) for r in good),
            "cpu": statistics.median(cpu) if cpu else None,
        }
    return med, used


def cpu_use_note(scen, targets, med, used, meta):
    """The note on where the CPU went during scenario scen's runs (the proxy's share of its
    CPU, wrk + origin's of theirs), or None without runs."""
    use = []
    load_max = 0.0
    for t in targets:
        rs = [r for r in used.get(t, []) if len(r) >= 14 and int(r[10]) > 0]
        if not rs:
            continue
        wall = sum(int(r[10]) for r in rs)
        load = sum(int(r[12]) + int(r[13]) for r in rs) / wall
        if t == "direct":
            use.append("direct —/%.0f%%" % (load * 100))
        else:
            load_max = max(load_max, load)
            use.append("%s %.0f%%/%.0f%%" % (t, sum(int(r[8]) for r in rs) / wall * 100,
                                             load * 100))
    if not use:
        return None
    proxies = [med[t]["rps"] for t in targets if t != "direct" and med.get(t)]
    text = ("%s: CPU busy during the runs (proxy on CPU %s / wrk + origin on CPU %s): %s."
            % (scen, meta.get("cpu_proxy", "0"), meta.get("cpu_load", "1"), ", ".join(use)))
    if med.get("direct") and proxies:
        text += (" Without a proxy, wrk + origin reach %.2f× the fastest proxy's rate."
                 % (med["direct"]["rps"] / max(proxies)))
    if load_max >= 0.85:
        text += (" CPU %s is near saturation in the proxied runs too, so req/s is "
                 "partly set by the load side and understates the differences between "
                 "proxies; CPU µs/req is the figure to compare." % meta.get("cpu_load", "1"))
    return text


def per_round_ratios(runs, scen, clk):
    """The ratio moongate / nginx + Lua within each round (two runs a few seconds apart, so a
    slow spell of the machine weighs on both), as one line; None without a complete round."""
    rounds = {}
    for r in runs:
        if len(r) >= 9 and r[0] == scen and r[1] in LUA_TARGETS and int(r[3]) > 0:
            rounds.setdefault(r[2], {})[r[1]] = r
    rps, cpu = [], []
    for k in sorted(rounds, key=lambda x: int(x)):
        a, b = rounds[k].get("moongate"), rounds[k].get("nginx-lua")
        if not (a and b):
            continue
        rps.append(float(a[4]) / float(b[4]))
        if a[8] != "-" and b[8] != "-":
            cpu.append((int(a[8]) / int(a[3])) / (int(b[8]) / int(b[3])))
    if not rps:
        return None
    line = "Per round (moongate / nginx + Lua, run back to back): req/s %s (median %.2f×)" % (
        ", ".join("%.2f×" % x for x in rps), statistics.median(rps))
    if cpu:
        line += "; CPU per request %s (median %.2f×)" % (
            ", ".join("%.2f×" % x for x in cpu), statistics.median(cpu))
    return line + "."


def render_lua(w, d, meta, runs, clk, notes):
    """The Lua scenarios: a table per scenario, moongate against nginx + Lua, with the ratios
    and the issue's targets."""
    lstatus = {(r[0], r[1]): r[2] for r in read_tsv(os.path.join(d, "lua-status.tsv"))
               if len(r) >= 3}
    w("### Lua scenarios: moongate vs nginx + Lua")
    w("")
    w("nginx + Lua = nginx with Debian's lua-nginx-module (OpenResty's `ngx_lua`; %s), one "
      "worker on CPU 0 like moongate (`-w 1`), doing the same work in `access_by_lua` / "
      "`content_by_lua` (and answering `X-Request-Id`, as moongate does), both with 256 idle "
      "keep-alive connections to the origin (configs: "
      "scripts/bench/moongate-lua.lua and nginx-lua.conf). Same wrk "
      "runs, interleaved rounds, medians and CPU accounting as above. Ratio = moongate / "
      "nginx + Lua: above 1 is better for req/s, below 1 is better for latency and CPU."
      % meta.get("lua_versions", "?"))
    w("")
    for scen, title, desc, rps_goal, cpu_goal in LUA_SCENARIOS:
        w("#### %s" % title)
        w("")
        w(desc)
        w("")
        med, used = scenario_stats(runs, scen, LUA_TARGETS, LUA_LABELS, meta, clk, notes)
        note = cpu_use_note(scen, LUA_TARGETS, med, used, meta)
        if note:
            notes.append(note)
        w("| Target | req/s (min–max) | p50 | p99 | CPU µs/req |")
        w("|---|---:|---:|---:|---:|")
        why = {}
        for t in LUA_TARGETS:
            m = med.get(t)
            if m is None:
                why[t] = lstatus.get((scen, t), "no result")
                if why[t] == "ok":
                    why[t] = "no result (see the notes)"
                w("| %s | %s | | | |" % (LUA_LABELS[t], why[t]))
                continue
            w("| %s | %s (%s–%s) | %s | %s | %s |" % (
                LUA_LABELS[t], fmt_int(m["rps"]), fmt_int(m["min"]), fmt_int(m["max"]),
                fmt_ms(m["p50"]), fmt_ms(m["p99"]),
                "%.1f" % m["cpu"] if m["cpu"] is not None else "—"))
        a, b = med.get("moongate"), med.get("nginx-lua")
        if a and b:
            w("| **ratio moongate / nginx + Lua** | **%s** | %s | %s | **%s** |" % (
                fmt_ratio(a["rps"], b["rps"]), fmt_ratio(a["p50"], b["p50"]),
                fmt_ratio(a["p99"], b["p99"]),
                fmt_ratio(a["cpu"], b["cpu"]) if a["cpu"] is not None else "—"))
        w("")
        paired = per_round_ratios(runs, scen, clk)
        if paired:
            w(paired)
            w("")
        if rps_goal is None:
            continue
        goal = "moongate ≥ %.1f× nginx + Lua's req/s" % rps_goal
        if cpu_goal is not None:
            goal += " and ≤ %.1f× its CPU per request" % cpu_goal
        if a and b:
            res = []
            r = a["rps"] / b["rps"]
            res.append("req/s %.2f× (%s)" % (r, "met" if r >= rps_goal else "**not met**"))
            if cpu_goal is not None and a["cpu"] is not None and b["cpu"]:
                c = a["cpu"] / b["cpu"]
                res.append("CPU per request %.2f× (%s)"
                           % (c, "met" if c <= cpu_goal else "**not met**"))
            w("Target: %s. Result: %s." % (goal, "; ".join(res)))
        else:
            w("Target: %s. Result: no comparison (no result for %s, see the table)." % (
                goal, " and ".join(LUA_LABELS[t] for t in LUA_TARGETS if t in why)))
        w("")


def render_reload(w, d, meta, notes):
    """The reload-latency table: median, min and max over the reloads, per proxy."""
    rows = read_tsv(os.path.join(d, "reload.tsv"))
    w("### Reload latency")
    w("")
    w("A config with 100 routes (in moongate's, a quarter of them with a Lua access hook); each "
      "of %s reloads rewrites the file with one more route (`GET /new/N`, answered from the "
      "config itself), asks the running proxy (one worker, CPU 0) to reload, and polls "
      "`GET /new/N` from CPU 1 (a fresh connection each time, 1 ms apart) until it answers "
      "200. Figure: time from the reload request to that first 200. Target: moongate's median "
      "< %.0f ms; nginx (which starts a new worker per reload) is the reference."
      % (meta.get("reloads", "10"), RELOAD_TARGET_MS))
    w("")
    w("| Proxy | reloaded by | reloads | median | min–max | target < %.0f ms |" % RELOAD_TARGET_MS)
    w("|---|---|---:|---:|---:|---|")
    for t, label in (("moongate", "moongate"), ("nginx", "nginx (reference)")):
        mine = [r for r in rows if r[0] == t]
        if not mine:
            w("| %s | | 0 | no result | | |" % label)
            continue
        method = next((r[2] for r in mine if r[1] == "method" and len(r) >= 3), "—")
        fail = next((r[2] for r in mine if r[1] == "fail" and len(r) >= 3), None)
        ms = [float(r[3]) for r in mine if r[1] == "round" and len(r) >= 6]
        bad_rc = [r for r in mine if r[1] == "round" and len(r) >= 6 and r[4] not in ("0", "-")]
        if bad_rc:
            notes.append("reload, %s: the reload command exited with %s in %d of %d reloads."
                         % (t, ", ".join(sorted(set(r[4] for r in bad_rc))), len(bad_rc),
                            len(ms)))
        if fail and ms:
            notes.append("reload, %s: after %d good reloads, %s." % (t, len(ms), fail))
        if not ms:
            fail = fail or "no result"
            if not fail.startswith("not available"):
                fail = "not available: " + fail
            w("| %s | %s | 0 | %s | | |" % (label, method, fail))
            continue
        m = statistics.median(ms)
        verdict = "—"
        if t == "moongate":
            verdict = "met" if m < RELOAD_TARGET_MS and not fail else "**not met**"
        w("| %s | %s | %d | %s | %s–%s | %s |" % (label, method, len(ms), fmt_ms(m),
                                                   fmt_ms(min(ms)), fmt_ms(max(ms)), verdict))
    w("")


def render(d):
    meta = read_meta(os.path.join(d, "meta.env"))
    status = {r[0]: r[1] for r in read_tsv(os.path.join(d, "status.tsv")) if len(r) >= 2}
    runs = read_tsv(os.path.join(d, "runs.tsv"))
    mem = read_tsv(os.path.join(d, "mem.tsv"))
    clk = float(meta.get("clk_tck", "100") or 100)
    # The parts bench.sh ran (BENCH_SCENARIOS); older runs without that line had no Lua parts.
    parts = meta.get("scenarios", "proxy mem").split()
    if "scenarios" not in meta:
        parts += [p for p, f in (("lua", "lua-status.tsv"), ("reload", "reload.tsv"))
                  if os.path.exists(os.path.join(d, f))]
    out = []
    w = out.append

    w("## moongate benchmark")
    w("")
    w("- Date: %s" % meta.get("date", "?"))
    w("- Machine: %s CPUs, %s, Linux %s" % (meta.get("nproc", "?"), meta.get("cpu", "?"),
                                             meta.get("kernel", "?")))
    w("- Versions: %s" % meta.get("versions", "?"))
    w("- Load average (1/5/15 min): %s" % meta.get("loadavg", "?"))
    w("- Method: origin = %s on CPU 1; proxy under test (one worker/thread) on CPU 0; "
      "`wrk -t1 -c50 -d%ss --latency` on CPU 1. %s interleaved rounds (direct, nginx, "
      "HAProxy, moongate, then the same in reverse order, and so on); each cell is the median of the rounds (leaving out runs "
      "disturbed by other processes, see notes), the req/s range is min–max. CPU = utime+stime of all the proxy's processes (/proc/PID/stat) over the "
      "run divided by the requests wrk completed.%s"
      % (meta.get("origin", "nginx"), meta.get("duration", "?"), meta.get("rounds", "3"),
         " **Quick mode (BENCH_QUICK=1): short runs, numbers are rough.**"
         if meta.get("quick") == "1" else ""))
    w("")

    notes = []
    for scen, title in SCENARIOS if "proxy" in parts else []:
        w("### %s" % title)
        w("")
        w("| Target | req/s (min–max) | req/s vs nginx | p50 | p99 | CPU µs/req | CPU vs nginx |")
        w("|---|---:|---:|---:|---:|---:|---:|")
        med, used = scenario_stats(runs, scen, TARGETS, LABELS, meta, clk, notes)
        base = med.get("nginx")
        note = cpu_use_note(scen, TARGETS, med, used, meta)
        if note:
            notes.append(note)
        for t in TARGETS:
            m = med[t]
            if m is None:
                why = status.get(t, "no result")
                w("| %s | %s: %s | | | | | |" % (LABELS[t], t, why))
                continue
            w("| %s | %s (%s–%s) | %s | %s | %s | %s | %s |" % (
                LABELS[t], fmt_int(m["rps"]), fmt_int(m["min"]), fmt_int(m["max"]),
                fmt_ratio(m["rps"], base["rps"] if base else None),
                fmt_ms(m["p50"]), fmt_ms(m["p99"]),
                "%.1f" % m["cpu"] if m["cpu"] is not None else "—",
                fmt_ratio(m["cpu"], base["cpu"] if base else None)
                if m["cpu"] is not None else "—"))
        w("")

    if "mem" in parts:
        w("### Memory per client connection")
        w("")
        w("RSS summed over all the proxy's processes (VmRSS from /proc), fresh proxy per "
          "measurement: (peak or held RSS − RSS before) / connections. User-space memory only; "
          "the kernel's socket buffers are not counted.")
        w("")
        w("| Proxy | %s active keep-alive (wrk) KiB/conn | vs nginx | %s idle KiB/conn | vs nginx |"
          % (fmt_int(float(meta.get("active_conns", "1000"))),
             fmt_int(float(meta.get("idle_conns", "10000")))))
        w("|---|---:|---:|---:|---:|")
        memv = {}
        for r in mem:
            # proxy kind conns before_kb after_kb note
            if len(r) >= 6:
                memv.setdefault(r[0], {})[r[1]] = r
        def per_conn(p, kind):
            r = memv.get(p, {}).get(kind)
            if not r or r[3] == "-" or r[4] == "-" or int(r[2]) <= 0:
                return None
            return (int(r[4]) - int(r[3])) / int(r[2])
        for p in ("nginx", "moongate"):
            a, i = per_conn(p, "active"), per_conn(p, "idle")
            if a is None and i is None:
                w("| %s | %s: %s | | | |" % (LABELS[p], p, status.get(p, "no result")))
                continue
            cells = []
            for v, kind in ((a, "active"), (i, "idle")):
                cells.append("%.2f" % v if v is not None else "n/a")
                cells.append(fmt_ratio(v, per_conn("nginx", kind)) if v is not None else "—")
            w("| %s | %s |" % (LABELS[p], " | ".join(cells)))
        if memv.get("nginx"):
            notes.append("nginx allocates and initialises its connection and event arrays for "
                         "worker_connections (20,000 here) at start, so that memory is in its "
                         "\"before\" figure, not in the per-connection difference.")
        for p in ("nginx", "moongate"):
            for kind in ("active", "idle"):
                r = memv.get(p, {}).get(kind)
                if r and r[3] != "-" and r[4] != "-":
                    notes.append("%s %s: RSS %s KiB before, %s KiB with %s connections%s."
                                 % (p, kind, fmt_int(float(r[3])), fmt_int(float(r[4])),
                                    fmt_int(float(r[2])), ("; " + r[5]) if r[5] not in ("", "-")
                                    else ""))
                elif r and r[5] not in ("", "-"):
                    notes.append("%s %s: %s." % (p, kind, r[5]))
        w("")
    if "lua" in parts:
        render_lua(w, d, meta, runs, clk, notes)
    if "reload" in parts:
        render_reload(w, d, meta, notes)
    if notes:
        w("Notes:")
        w("")
        for n in notes:
            w("- " + n)
        w("")
    sys.stdout.write("\n".join(out))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "parse-wrk":
        r = parse_wrk(sys.argv[2])
        if r is None:
            print("0 0 0 0 -1")
        else:
            print("%d %.2f %.4f %.4f %d" % r)
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "check-agg":
        print(check_agg(sys.argv[2]))
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "render":
        render(sys.argv[2])
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
