"""`moongate check -c FILE`: a valid config passes with "ok"; an invalid one gets every error
printed as "file:line: message" (the line the user must edit) and exit status 1."""

import re
import textwrap

from mgtest import run_cli

GOOD = textwrap.dedent('''\
    gateway { workers = 1, pid_file = "/tmp/mg-check.pid", drain_timeout = "5s",
              error_log = "stderr", log_level = "info", access_log = "off",
              redact_query = { "apikey", "token" } }
    limits { header_bytes = "16k", header_count = 100, uri_bytes = "8k", body_bytes = "1m",
             chunk_ext_bytes = "4k", header_timeout = "10s", body_timeout = "30s",
             keepalive_timeout = "60s", keepalive_requests = 1000, send_timeout = "60s",
             max_connections = 10000 }
    listen { port = 18080, host = "127.0.0.1" }
    listen "demo" { port = 19001, host = "127.0.0.1" }
    upstream "users" { "127.0.0.1:9001", { "127.0.0.1:9002", weight = 3 }, "localhost:9003",
                       timeout = "2s", connect_timeout = "500ms", send_timeout = 60,
                       keepalive = 32, keepalive_timeout = "60s", keepalive_requests = 1000,
                       max_fails = 3, fail_timeout = "10s" }
    route "GET /users/:id" { upstream = "users" }
    route "GET,POST /orders" { upstream = "users", max_body = "10m" }
    route "/static/*" { upstream = "users", strip_prefix = "/static",
                        host = { "a.example.com", "*.example.com" }, host_header = "upstream" }
    route "GET /v1/items/:id" { upstream = "users", rewrite = "/v2/:id", host_header = "pass" }
    route "GET /hello" { respond = { 200, "hello\\n", { ["X-Demo"] = "1" } } }
    route "GET /demo" { listen = "demo", respond = { 200, { id = 1, name = "demo" } } }
    ''')


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def check(path):
    cp = run_cli(["check", "-c", path], timeout=10)
    return cp.returncode, cp.stdout + cp.stderr


def error_line(output, file, line, *words):
    """The output line that reports FILE:LINE (any directory before FILE) and holds every
    word of WORDS (case-insensitive), or None."""
    pat = re.compile(r"(^|[\s/'\"])" + re.escape(file) + ":" + str(line) + r": ")
    for text in output.splitlines():
        if pat.search(text) and all(w.lower() in text.lower() for w in words):
            return text
    return None


def test_valid_config_passes(tmp_path):
    code, out = check(write(tmp_path, "good.lua", GOOD))
    assert code == 0, out
    assert "ok" in out.lower(), out
    assert not re.search(r"good\.lua:\d+:", out), out


def test_every_error_is_reported_with_file_and_line(tmp_path):
    main = textwrap.dedent('''\
        gateway { workers = 1, pid_file = "/tmp/mg-check.pid" }
        listen { port = 18080, host = "127.0.0.1" }
        upstream "users" { "127.0.0.1:9001", colour = "blue" }
        listen "bad" { port = 70000 }
        route "GET /users/:id" { upstream = "users" }
        route "GET /orders" { upstream = "orders" }
        route "GET /hello" { respond = { 200, "hello" } }
        ''')
    code, out = check(write(tmp_path, "main.lua", main))
    assert code == 1, out
    assert error_line(out, "main.lua", 3, "colour"), out          # unknown key
    assert error_line(out, "main.lua", 4, "port"), out            # port out of range
    assert error_line(out, "main.lua", 6, "orders"), out          # unknown upstream
    # Nothing is blamed on the lines that are right.
    for good_line in (1, 2, 5, 7):
        assert not error_line(out, "main.lua", good_line), out


def test_syntax_error_is_reported_with_file_and_line(tmp_path):
    # The config language has no way to load a second file (no include), so the syntax error
    # sits in the config file itself.
    main = textwrap.dedent('''\
        listen { port = 18080, host = "127.0.0.1" }
        route "GET /a" { respond = { 200, "a" } }
        route "GET /b" { respond = { 200 "b" } }
        route "GET /c" { respond = { 200, "c" } }
        ''')
    code, out = check(write(tmp_path, "syntax.lua", main))
    assert code == 1, out
    assert error_line(out, "syntax.lua", 3), out
    for good_line in (1, 2, 4):
        assert not error_line(out, "syntax.lua", good_line), out


def test_unknown_dsl_function_is_reported_with_file_and_line(tmp_path):
    main = textwrap.dedent('''\
        listen { port = 18080, host = "127.0.0.1" }
        route "GET /hello" { respond = { 200, "hello" } }
        ratelimit "api" { rate = 10 }
        ''')
    code, out = check(write(tmp_path, "dsl.lua", main))
    assert code == 1, out
    assert error_line(out, "dsl.lua", 3, "ratelimit"), out


def test_missing_config_file_is_an_error(tmp_path):
    path = str(tmp_path / "absent.lua")
    code, out = check(path)
    assert code == 1, out
    assert "absent.lua" in out, out
