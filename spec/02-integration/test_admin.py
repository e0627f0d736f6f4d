"""The admin API on its own listener: GET /status (shape and values), POST /reload, the bearer
token when one is set, JSON errors (401, 404, 405), the status file next to the pid file, and
the rule that a non-loopback admin address needs a token (`moongate check`)."""

import os
import re
import socket
import time

from mgtest import Client, Gateway, free_port, request, run_cli, wait_for

HEAD = ('gateway { pid_file = "{tmp}/moongate.pid", access_log = "{tmp}/access.log", '
        'error_log = "stderr" }\n'
        'listen { port = {port}, host = "127.0.0.1" }\n')
ROUTES = 'route "GET /v" { respond = { 200, "v1" } }\n'
TOKEN = "s3cret-Token.42"


def start(admin_block, workers=2, env=None):
    """A gateway whose admin listener (gw.admin) is ADMIN_BLOCK with {admin} its port; returns
    once /status names every worker (waiting with the token when there is one)."""
    admin = free_port()
    gw = Gateway(HEAD + admin_block + "\n" + ROUTES, workers=workers, admin=admin, env=env)
    gw.admin = admin
    headers = {"Authorization": "Bearer " + TOKEN} if "token" in admin_block else None

    def ready():
        r = request(admin, "GET", "/status", headers=headers)
        doc = r.json() if r.status == 200 else None
        return doc and all(w["generation"] == 1 and w["pid"] > 0 for w in doc["workers"])
    assert wait_for(ready, timeout=5), gw.stderr_text()
    return gw


def assert_json_error(r, status):
    assert r.status == status, r
    assert r.header("content-type").startswith("application/json"), r
    doc = r.json()
    assert doc["status"] == status and isinstance(doc["error"], str) and doc["error"], doc
    return doc


def test_status_shape_and_values():
    with start('admin { port = {admin}, host = "127.0.0.1" }') as gw:
        r = request(gw.admin, "GET", "/status")
        assert r.status == 200, r
        assert r.header("content-type").startswith("application/json"), r
        doc = r.json()
        assert set(doc) == {"version", "master_pid", "uptime", "generation", "workers",
                            "reloads", "reload_failures", "last_reload"}, doc
        version = run_cli(["version"]).stdout.split()[-1]
        assert doc["version"] == version, (doc, version)
        assert doc["master_pid"] == gw.pid
        assert isinstance(doc["uptime"], (int, float)) and 0 <= doc["uptime"] < 30, doc
        assert doc["generation"] == 1
        assert doc["reloads"] == 0 and doc["reload_failures"] == 0
        assert doc["last_reload"] is None
        ws = doc["workers"]
        assert [w["slot"] for w in ws] == [0, 1], ws
        assert sorted(w["pid"] for w in ws) == gw.worker_pids(), (ws, gw.worker_pids())
        for w in ws:
            assert set(w) == {"slot", "pid", "generation"} and w["generation"] == 1, w
        # uptime moves on.
        time.sleep(0.2)
        later = request(gw.admin, "GET", "/status").json()
        assert later["uptime"] >= doc["uptime"] + 0.15, (doc["uptime"], later["uptime"])
        # HEAD answers the same status without a body.
        with Client(gw.admin) as c:
            r = c.request("HEAD", "/status")
            assert r.status == 200 and r.body == b"", r
            # Keep-alive: a second request on the same connection.
            r = c.request("GET", "/status")
            assert r.status == 200 and r.json()["master_pid"] == gw.pid, r
        # After a reload, last_reload says when and that it went well.
        before = time.time()
        r = request(gw.admin, "POST", "/reload", body=b"")
        assert r.status == 200, r
        doc = request(gw.admin, "GET", "/status").json()
        assert doc["generation"] == 2 and doc["reloads"] == 1, doc
        assert set(doc["last_reload"]) == {"ok", "time"}, doc
        assert doc["last_reload"]["ok"] is True
        assert before - 1 <= doc["last_reload"]["time"] <= time.time() + 1, doc
        assert gw.stop() == 0


def test_status_file_lives_next_to_the_pid_file():
    with start('admin { port = {admin}, host = "127.0.0.1" }', workers=1) as gw:
        path = os.path.join(gw.tmp, "moongate.pid.status")
        assert os.path.exists(path)
        assert gw.stop() == 0
        assert not os.path.exists(path)
        assert not os.path.exists(os.path.join(gw.tmp, "moongate.pid"))


def test_token_is_required_when_set():
    block = 'admin { port = {admin}, host = "127.0.0.1", token = "%s" }' % TOKEN
    with start(block) as gw:
        bad = [None, "Bearer wrong", "Bearer " + TOKEN[:-1], "Bearer " + TOKEN + "x",
               "Basic " + TOKEN, TOKEN, "Bearer", "Bearer  " + TOKEN]
        for value in bad:
            headers = {"Authorization": value} if value is not None else None
            for method, path in (("GET", "/status"), ("POST", "/reload"), ("GET", "/nothing")):
                r = request(gw.admin, method, path, headers=headers,
                            body=b"" if method == "POST" else None)
                doc = assert_json_error(r, 401)
                assert TOKEN not in r.body.decode(), doc
        # No unauthorised POST /reload went through.
        ok = {"Authorization": "Bearer " + TOKEN}
        doc = request(gw.admin, "GET", "/status", headers=ok).json()
        assert doc["reloads"] == 0 and doc["generation"] == 1, doc
        # The scheme is case-insensitive; the token is not.
        for value in ("Bearer " + TOKEN, "bearer " + TOKEN, "BEARER " + TOKEN):
            r = request(gw.admin, "GET", "/status", headers={"Authorization": value})
            assert r.status == 200 and r.json()["master_pid"] == gw.pid, (value, r)
        r = request(gw.admin, "GET", "/status",
                    headers={"Authorization": "Bearer " + TOKEN.upper()})
        assert_json_error(r, 401)
        r = request(gw.admin, "POST", "/reload", headers=ok, body=b"")
        assert r.status == 200 and r.json() == {"ok": True, "generation": 2}, r
        # The main listener does not need (or know) the token.
        assert request(gw.port, "GET", "/v").body == b"v1"
        assert gw.stop() == 0


def test_token_from_the_environment():
    block = 'admin { port = {admin}, host = "127.0.0.1", token = env("MG_TEST_ADMIN_TOKEN") }'
    with start(block, workers=1, env={"MG_TEST_ADMIN_TOKEN": TOKEN}) as gw:
        assert_json_error(request(gw.admin, "GET", "/status"), 401)
        r = request(gw.admin, "GET", "/status", headers={"Authorization": "Bearer " + TOKEN})
        assert r.status == 200, r
        assert gw.stop() == 0


def test_unknown_path_is_404_and_wrong_method_is_405():
    with start('admin { port = {admin}, host = "127.0.0.1" }', workers=1) as gw:
        for path in ("/", "/nothing", "/status/", "/statusx", "/reload/x", "/v"):
            assert_json_error(request(gw.admin, "GET", path), 404)
        for method in ("GET", "HEAD", "PUT", "DELETE"):
            r = request(gw.admin, method, "/reload")
            assert r.status == 405, (method, r)
            if method != "HEAD":
                assert_json_error(r, 405)
        for method in ("POST", "PUT", "DELETE"):
            assert_json_error(request(gw.admin, method, "/status", body=b""), 405)
        # None of these reloaded anything.
        doc = request(gw.admin, "GET", "/status").json()
        assert doc["reloads"] == 0 and doc["generation"] == 1, doc
        # The admin API is not on the main listener, and the routes are not on the admin one.
        assert request(gw.port, "GET", "/status").status == 404
        assert request(gw.admin, "GET", "/v").status == 404
        assert gw.stop() == 0


def test_client_leaving_during_post_reload_harms_nothing():
    with start('admin { port = {admin}, host = "127.0.0.1" }', workers=1) as gw:
        s = socket.create_connection(("127.0.0.1", gw.admin), timeout=5)
        s.sendall(b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        s.close()
        assert wait_for(lambda: request(gw.admin, "GET", "/status").json()["generation"] == 2,
                        timeout=3)
        # The worker that held the abandoned request still serves, and reloads again.
        r = request(gw.admin, "POST", "/reload", body=b"")
        assert r.status == 200 and r.json()["generation"] == 3, r
        assert request(gw.port, "GET", "/v").body == b"v1"
        assert gw.stop() == 0


def write_config(tmp, text):
    path = os.path.join(tmp, "admin.lua")
    with open(path, "w") as f:
        f.write(text)
    return path


def test_check_requires_a_token_on_a_non_loopback_admin_address(tmp_path):
    base = ('listen { port = 18080 }\n'                                  # line 1
            'route "GET /v" { respond = { 200, "v1" } }\n')              # line 2
    path = write_config(str(tmp_path), base + 'admin { port = 19180, host = "0.0.0.0" }\n')
    p = run_cli(["check", "-c", path])
    assert p.returncode == 1, p
    assert re.search(r"admin\.lua:3: admin: host 0\.0\.0\.0 is not a loopback address, so a "
                     r"token is required", p.stderr), p.stderr
    for host in ("127.0.0.1", "127.0.0.2", "::1"):
        path = write_config(str(tmp_path), base + 'admin { port = 19180, host = "%s" }\n' % host)
        p = run_cli(["check", "-c", path])
        assert p.returncode == 0, (host, p.stderr)
    path = write_config(str(tmp_path),
                        base + 'admin { port = 19180, host = "0.0.0.0", token = "t" }\n')
    p = run_cli(["check", "-c", path])
    assert p.returncode == 0, p.stderr
