/* test_config: the config loader (src/mg_config.c + lua/moongate/config.lua) against the
 * fixtures in spec/fixtures/config: every field and default of good files, and the exact
 * "file:line: message" text of every error in bad ones. Run from the repository root. */
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mg_config.h"
#include "mg_log.h"
#include "mg_test.h"

#define FIX "spec/fixtures/config/"

/* Loads a fixture that must be valid; fails the test with the error text otherwise. */
static void load_ok(const char *file, mg_config_t *cfg)
{
  char *errors = NULL;
  int rc = mg_config_load(file, cfg, &errors);
  if (rc != 0) {
    fprintf(stderr, "%s", errors ? errors : "(no error text)\n");
    free(errors);
    MG_FAIL("mg_config_load(%s) failed", file);
  }
  MG_CHECK(errors == NULL);
}

/* Loads FILE, which must fail, and returns the error text (caller frees). */
static char *load_bad(const char *file)
{
  mg_config_t cfg;
  char *errors = NULL;
  int rc = mg_config_load(file, &cfg, &errors);
  if (rc == 0) mg_config_free(&cfg);
  MG_CHECK_INT(rc, -1);
  MG_CHECK(errors != NULL);
  /* A failed load leaves nothing to free. */
  MG_CHECK(cfg.file == NULL && cfg.listens == NULL && cfg.routes == NULL && cfg.nroutes == 0);
  return errors;
}

/* Checks that loading FILE reports exactly the lines EXPECTED (each without the leading file
 * name, which is FILE as given), in that order, and nothing else. */
static void expect_errors(const char *file, const char *const *expected)
{
  char *errors = load_bad(file);
  size_t len = 1;
  for (size_t i = 0; expected[i]; i++) len += strlen(file) + strlen(expected[i]) + 1;
  char *want = malloc(len);
  MG_CHECK(want != NULL);
  want[0] = '\0';
  for (size_t i = 0; expected[i]; i++) {
    strcat(want, file);
    strcat(want, expected[i]);
    strcat(want, "\n");
  }
  int same = strcmp(errors, want) == 0;
  if (!same) fprintf(stderr, "--- got:\n%s--- expected:\n%s---\n", errors, want);
  free(want);
  free(errors);
  MG_CHECK(same);
}

/* A route of CFG by the line it was declared on. */
static const mg_route_conf_t *route_at(const mg_config_t *cfg, int line)
{
  for (size_t i = 0; i < cfg->nroutes; i++)
    if (cfg->routes[i].line == line) return &cfg->routes[i];
  return NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* Good files */
/* ---------------------------------------------------------------------------------------- */

static void test_defaults(void)
{
  mg_config_t cfg;
  load_ok(FIX "minimal.lua", &cfg);
  char *abs = realpath(FIX "minimal.lua", NULL);
  int file_ok = abs && cfg.file && strcmp(cfg.file, abs) == 0 && cfg.file[0] == '/';
  free(abs);
  if (!file_ok) mg_config_free(&cfg);
  MG_CHECK(file_ok);

  MG_CHECK_INT(cfg.workers, 0);
  MG_CHECK_STR(cfg.pid_file, "/tmp/moongate.pid");
  MG_CHECK(cfg.drain_timeout == 10);
  MG_CHECK_STR(cfg.access_log, "stdout");
  MG_CHECK_STR(cfg.error_log, "stderr");
  MG_CHECK_INT(cfg.log_level, MG_LOG_INFO);
  MG_CHECK_INT(cfg.nredact_query, 3);
  MG_CHECK_STR(cfg.redact_query[0], "apikey");
  MG_CHECK_STR(cfg.redact_query[1], "token");
  MG_CHECK_STR(cfg.redact_query[2], "access_token");

  const mg_limits_conf_t *l = &cfg.limits;
  MG_CHECK_INT(l->header_bytes, 16384);
  MG_CHECK_INT(l->header_count, 100);
  MG_CHECK_INT(l->uri_bytes, 8192);
  MG_CHECK_INT(l->body_bytes, 1048576);
  MG_CHECK_INT(l->chunk_ext_bytes, 4096);
  MG_CHECK(l->header_timeout == 10);
  MG_CHECK(l->body_timeout == 30);
  MG_CHECK(l->keepalive_timeout == 60);
  MG_CHECK_INT(l->keepalive_requests, 1000);
  MG_CHECK(l->send_timeout == 60);
  MG_CHECK_INT(l->max_connections, 10000);

  MG_CHECK_INT(cfg.nlistens, 1);
  MG_CHECK(cfg.listens[0].name == NULL);
  MG_CHECK_STR(cfg.listens[0].host, "0.0.0.0");
  MG_CHECK_INT(cfg.listens[0].port, 8080);
  MG_CHECK_INT(cfg.listens[0].backlog, 511);
  MG_CHECK_INT(cfg.nupstreams, 0);
  MG_CHECK_INT(cfg.nroutes, 0);
  MG_CHECK(mg_config_upstream(&cfg, "users") == NULL);
  mg_config_free(&cfg);
  MG_CHECK(cfg.file == NULL && cfg.nlistens == 0);
}

static void test_full(void)
{
  mg_config_t cfg;
  load_ok(FIX "full.lua", &cfg);
  MG_CHECK_INT(cfg.workers, 4);
  MG_CHECK_STR(cfg.pid_file, "/run/moongate.pid");
  MG_CHECK(cfg.drain_timeout == 60);
  MG_CHECK(cfg.access_log == NULL);
  MG_CHECK_STR(cfg.error_log, "/var/log/moongate/error.log");
  MG_CHECK_INT(cfg.log_level, MG_LOG_WARN);
  MG_CHECK_INT(cfg.nredact_query, 2);
  MG_CHECK_STR(cfg.redact_query[0], "key");
  MG_CHECK_STR(cfg.redact_query[1], "sig");

  const mg_limits_conf_t *l = &cfg.limits;
  MG_CHECK_INT(l->header_bytes, 32768);
  MG_CHECK_INT(l->header_count, 50);
  MG_CHECK_INT(l->uri_bytes, 4096);
  MG_CHECK_INT(l->body_bytes, 2 * 1048576);
  MG_CHECK_INT(l->chunk_ext_bytes, 1024);
  MG_CHECK(l->header_timeout == 5);
  MG_CHECK(l->body_timeout == 0.25);
  MG_CHECK(l->keepalive_timeout == 120);
  MG_CHECK_INT(l->keepalive_requests, 10);
  MG_CHECK(l->send_timeout == 1.5);
  MG_CHECK_INT(l->max_connections, 20000);

  MG_CHECK_INT(cfg.nlistens, 3);
  MG_CHECK(cfg.listens[0].name == NULL);
  MG_CHECK_STR(cfg.listens[0].host, "::");
  MG_CHECK_INT(cfg.listens[0].port, 8080);
  MG_CHECK_INT(cfg.listens[0].backlog, 1024);
  MG_CHECK_STR(cfg.listens[1].name, "demo");
  MG_CHECK_STR(cfg.listens[1].host, "127.0.0.1"); /* "localhost" */
  MG_CHECK_INT(cfg.listens[1].port, 9001);
  MG_CHECK_INT(cfg.listens[1].backlog, 511);
  MG_CHECK_STR(cfg.listens[2].name, "v6");
  MG_CHECK_STR(cfg.listens[2].host, "::1");        /* "[::1]" */

  MG_CHECK_INT(cfg.nupstreams, 2);
  const mg_upstream_conf_t *u = mg_config_upstream(&cfg, "users");
  MG_CHECK(u == &cfg.upstreams[0]);
  MG_CHECK_STR(u->name, "users");
  MG_CHECK_STR(u->file, cfg.file);
  MG_CHECK_INT(u->line, 21);
  MG_CHECK_INT(u->ntargets, 4);
  MG_CHECK_STR(u->targets[0].host, "127.0.0.1");
  MG_CHECK_INT(u->targets[0].port, 9001);
  MG_CHECK_INT(u->targets[0].weight, 1);
  MG_CHECK_STR(u->targets[1].host, "10.0.0.2");
  MG_CHECK_INT(u->targets[1].port, 80);
  MG_CHECK_INT(u->targets[1].weight, 3);
  MG_CHECK_STR(u->targets[2].host, "api.internal");
  MG_CHECK_INT(u->targets[2].port, 8080);
  MG_CHECK_STR(u->targets[3].host, "::1");
  MG_CHECK_INT(u->targets[3].port, 9002);
  MG_CHECK(u->read_timeout == 2);                  /* timeout = "2s" */
  MG_CHECK(u->connect_timeout == 0.5);
  MG_CHECK(u->send_timeout == 3);
  MG_CHECK_INT(u->keepalive_max_idle, 0);
  MG_CHECK(u->keepalive_timeout == 30);
  MG_CHECK_INT(u->keepalive_requests, 50);
  MG_CHECK_INT(u->max_fails, 0);
  MG_CHECK(u->fail_timeout == 3600);
  MG_CHECK(u->dns_ttl == 0);

  u = mg_config_upstream(&cfg, "orders");
  MG_CHECK(u == &cfg.upstreams[1]);
  MG_CHECK_INT(u->line, 27);
  MG_CHECK_INT(u->ntargets, 1);
  MG_CHECK_STR(u->targets[0].host, "orders.internal");
  MG_CHECK(u->read_timeout == 7);
  MG_CHECK_INT(u->keepalive_max_idle, 8);
  /* The defaults of an upstream. */
  MG_CHECK(u->connect_timeout == 5);
  MG_CHECK(u->send_timeout == 60);
  MG_CHECK(u->keepalive_timeout == 60);
  MG_CHECK_INT(u->keepalive_requests, 1000);
  MG_CHECK_INT(u->max_fails, 3);
  MG_CHECK(u->fail_timeout == 10);
  MG_CHECK(u->dns_ttl == 30);
  MG_CHECK(mg_config_upstream(&cfg, "nope") == NULL);

  MG_CHECK_INT(cfg.nroutes, 1);
  MG_CHECK_INT(cfg.routes[0].max_body, 2 * 1048576); /* limits.body_bytes */
  mg_config_free(&cfg);
}

static void test_routes(void)
{
  mg_config_t cfg;
  load_ok(FIX "routes.lua", &cfg);
  MG_CHECK_INT(cfg.nroutes, 13);
  const mg_route_conf_t *r;

  r = route_at(&cfg, 6); /* after a "#!" line, lines still count from the top */
  MG_CHECK(r == &cfg.routes[0]);
  MG_CHECK_STR(r->file, cfg.file);
  MG_CHECK_STR(r->spec, "GET /users/:id");
  MG_CHECK_STR(r->name, "GET /users/:id");
  MG_CHECK_INT(r->methods, MG_M_GET);
  MG_CHECK_STR(r->path, "/users/:id");
  MG_CHECK_INT(r->nhosts, 0);
  MG_CHECK(r->listen == NULL);
  MG_CHECK_STR(r->upstream, "users");
  MG_CHECK(r->strip_prefix == NULL && r->rewrite == NULL && r->host_value == NULL);
  MG_CHECK_INT(r->host_policy, MG_HOST_PASS);
  MG_CHECK_INT(r->respond_status, 0);
  MG_CHECK(r->respond_body == NULL && r->nrespond_headers == 0);
  MG_CHECK_INT(r->max_body, 1048576);

  r = route_at(&cfg, 7);
  MG_CHECK(r != NULL);
  MG_CHECK_STR(r->listen, "demo");
  MG_CHECK(r->upstream == NULL);
  MG_CHECK_INT(r->respond_status, 200);
  MG_CHECK_MEM(r->respond_body, r->respond_body_len, "{\"id\":1,\"name\":\"demo\"}");
  MG_CHECK_INT(r->nrespond_headers, 1);
  MG_CHECK_STR(r->respond_headers[0].name, "Content-Type");
  MG_CHECK_STR(r->respond_headers[0].value, "application/json");

  r = route_at(&cfg, 8);
  MG_CHECK(r != NULL);
  MG_CHECK_INT(r->methods, MG_METHOD_ANY);
  MG_CHECK_STR(r->path, "/static/*");
  MG_CHECK_STR(r->strip_prefix, "/static");
  MG_CHECK_INT(r->nhosts, 1);
  MG_CHECK_STR(r->hosts[0], "api.example.com"); /* lower-cased */

  r = route_at(&cfg, 9);
  MG_CHECK(r != NULL);
  MG_CHECK_STR(r->spec, "GET,POST /v1/:id/*");
  MG_CHECK_STR(r->name, "v1");
  MG_CHECK_INT(r->methods, MG_M_GET | MG_M_POST);
  MG_CHECK_STR(r->rewrite, "/v2/:id/*");
  MG_CHECK_INT(r->nhosts, 2);
  MG_CHECK_STR(r->hosts[0], "a.example.com");
  MG_CHECK_STR(r->hosts[1], "*.example.com");
  MG_CHECK_INT(r->host_policy, MG_HOST_UPSTREAM);
  MG_CHECK_INT(r->max_body, 10 * 1048576);

  r = route_at(&cfg, 13);
  MG_CHECK(r != NULL);
  MG_CHECK_STR(r->strip_prefix, "/files"); /* strip_prefix = true */
  MG_CHECK_INT(r->host_policy, MG_HOST_FIXED);
  MG_CHECK_STR(r->host_value, "backend.internal");

  r = route_at(&cfg, 14);
  MG_CHECK(r != NULL);
  MG_CHECK_INT(r->methods, MG_M_OTHER); /* PURGE */
  MG_CHECK_INT(r->host_policy, MG_HOST_PASS);

  r = route_at(&cfg, 15);
  MG_CHECK(r != NULL);
  MG_CHECK_INT(r->respond_status, 200);
  MG_CHECK_MEM(r->respond_body, r->respond_body_len, "ok");
  MG_CHECK_INT(r->nrespond_headers, 1);
  MG_CHECK_STR(r->respond_headers[0].value, "text/plain");

  r = route_at(&cfg, 16); /* no body: an empty one, and no Content-Type */
  MG_CHECK(r != NULL);
  MG_CHECK_INT(r->respond_status, 204);
  MG_CHECK(r->respond_body != NULL);
  MG_CHECK_INT(r->respond_body_len, 0);
  MG_CHECK_INT(r->nrespond_headers, 0);

  r = route_at(&cfg, 17); /* the script's Content-Type wins; headers sorted by name */
  MG_CHECK(r != NULL);
  MG_CHECK_INT(r->respond_status, 418);
  MG_CHECK_MEM(r->respond_body, r->respond_body_len, "short\n");
  MG_CHECK_INT(r->nrespond_headers, 2);
  MG_CHECK_STR(r->respond_headers[0].name, "Content-Type");
  MG_CHECK_STR(r->respond_headers[0].value, "text/x-tea");
  MG_CHECK_STR(r->respond_headers[1].name, "X-Pot");
  MG_CHECK_STR(r->respond_headers[1].value, "1");

  r = route_at(&cfg, 18); /* JSON: sorted keys, {} for an empty table, escapes */
  MG_CHECK(r != NULL);
  MG_CHECK_MEM(r->respond_body, r->respond_body_len,
               "{\"empty\":{},\"list\":[1,2.5,9.99,true,\"a\\\"b\\n\\u0001\"],\"n\":[[\"x\"]]}");

  r = route_at(&cfg, 19); /* any method next to GET on the same path: a fallback, no clash */
  MG_CHECK(r != NULL);
  MG_CHECK_INT(r->methods, MG_METHOD_ANY);

  r = route_at(&cfg, 20);
  MG_CHECK(r != NULL);
  MG_CHECK_STR(r->path, "/");
  MG_CHECK_INT(r->respond_status, 404);
  MG_CHECK_INT(r->nrespond_headers, 1); /* an empty string body is still a text body */

  r = route_at(&cfg, 21);
  MG_CHECK(r != NULL);
  MG_CHECK_INT(r->methods, MG_M_OPTIONS | MG_M_HEAD | MG_M_PUT | MG_M_DELETE | MG_M_PATCH |
                           MG_M_TRACE | MG_M_CONNECT);
  mg_config_free(&cfg);
}

static void test_program(void)
{
  mg_config_t cfg;
  load_ok(FIX "program.lua", &cfg);
  MG_CHECK_INT(cfg.listens[0].port, 8080);
  MG_CHECK_INT(cfg.nupstreams, 3);
  MG_CHECK_STR(cfg.upstreams[2].name, "billing");
  MG_CHECK_STR(cfg.upstreams[2].targets[0].host, "127.0.0.1");
  MG_CHECK_INT(cfg.upstreams[2].targets[0].port, 9003);
  MG_CHECK(cfg.upstreams[2].read_timeout == 3);
  MG_CHECK_INT(cfg.upstreams[2].line, 7); /* declared inside a loop */
  MG_CHECK_INT(cfg.nroutes, 5);
  MG_CHECK_STR(cfg.routes[1].path, "/orders/*");
  MG_CHECK_STR(cfg.routes[1].strip_prefix, "/orders");
  MG_CHECK_INT(cfg.routes[1].line, 8);
  /* A table changed after its directive ran does not change what was declared. */
  MG_CHECK_STR(cfg.routes[3].upstream, "users");
  MG_CHECK_STR(cfg.routes[4].upstream, "orders");
  mg_config_free(&cfg);
}

static void test_env(void)
{
  mg_config_t cfg;
  setenv("MG_TEST_PORT", "9999", 1);
  setenv("MG_TEST_TARGET", "backend.internal:81", 1);
  setenv("MG_TEST_WORKERS", "3", 1);
  unsetenv("MG_TEST_UNSET");
  unsetenv("MG_TEST_UNSET_HOST");
  load_ok(FIX "env.lua", &cfg);
  MG_CHECK_INT(cfg.listens[0].port, 9999);        /* a number default makes it a number */
  MG_CHECK_STR(cfg.listens[0].host, "127.0.0.1"); /* unset: the default */
  MG_CHECK_STR(cfg.upstreams[0].targets[0].host, "backend.internal");
  MG_CHECK_INT(cfg.upstreams[0].targets[0].port, 81);
  MG_CHECK_INT(cfg.upstreams[0].keepalive_max_idle, 7);
  MG_CHECK_STR(cfg.pid_file, "/tmp/env.pid");
  MG_CHECK_INT(cfg.workers, 3);
  mg_config_free(&cfg);
}

static void test_free_zeroed(void)
{
  mg_config_t cfg;
  memset(&cfg, 0, sizeof cfg);
  mg_config_free(&cfg);
  mg_config_free(&cfg);
  MG_CHECK(mg_config_upstream(&cfg, "x") == NULL);
}

/* Each load has its own Lua state: nothing of one file leaks into the next. */
static void test_loads_are_independent(void)
{
  mg_config_t a, b;
  load_ok(FIX "routes.lua", &a);
  char *errors = load_bad(FIX "bad_syntax.lua");
  free(errors);
  load_ok(FIX "minimal.lua", &b);
  MG_CHECK_INT(a.nroutes, 13);
  MG_CHECK_INT(b.nroutes, 0);
  mg_config_free(&a);
  mg_config_free(&b);
}

/* ---------------------------------------------------------------------------------------- */
/* Bad files: the exact text a user sees from `moongate check` */
/* ---------------------------------------------------------------------------------------- */

static const char *const bad_gateway_errors[] = {
    ":2: gateway: workers must be \"auto\" or an integer in 1..1024, got 0",
    ":2: gateway: pid_file must be a non-empty string, got \"\"",
    ":2: gateway: drain_timeout must be a duration (seconds, or a string like \"250ms\", \"10s\", \"2m\", \"1h\"), got \"10 sec\"",
    ":2: gateway: error_log must be a non-empty string, got 5",
    ":2: gateway: log_level must be one of debug, info, warn, error, off, got \"verbose\"",
    ":2: gateway: access_log must be a non-empty string, got a table",
    ":2: gateway: redact_query must be a list of names, got \"token\"",
    ":2: gateway: unknown key 'wokers' (did you mean 'workers'?)",
    ":12: gateway is declared twice (first at line 2)",
    ":13: limits: header_bytes must be a size in bytes (a number, or a string like \"512\", \"16k\", \"1m\", \"1g\"), got \"16q\"",
    ":13: limits: header_count must be an integer >= 1, got 0",
    ":13: limits: uri_bytes must be at least 1 byte, got 0",
    ":13: limits: body_bytes must be a size in bytes (a number, or a string like \"512\", \"16k\", \"1m\", \"1g\"), got -1",
    ":13: limits: chunk_ext_bytes must be a size in bytes (a number, or a string like \"512\", \"16k\", \"1m\", \"1g\"), got 1.5",
    ":13: limits: header_timeout must be longer than 0, got 0",
    ":13: limits: body_timeout must be a duration (seconds, or a string like \"250ms\", \"10s\", \"2m\", \"1h\"), got \"30 s\"",
    ":13: limits: keepalive_timeout must be a duration (seconds, or a string like \"250ms\", \"10s\", \"2m\", \"1h\"), got -1",
    ":13: limits: keepalive_requests must be an integer >= 1, got 2.5",
    ":13: limits: send_timeout must be a duration (seconds, or a string like \"250ms\", \"10s\", \"2m\", \"1h\"), got true",
    ":13: limits: max_connections must be an integer >= 1, got \"10000\"",
    ":13: limits: unknown key true",
    ":13: limits: unexpected value \"oops\" (settings are written name = value)",
    ":19: limits is declared twice (first at line 13)",
    NULL,
};

static const char *const bad_listen_errors[] = {
    ":2: listen: port must be an integer in 1..65535, got 70000",
    ":3: listen: a default listener is already declared at line 2 (name this one: listen \"name\" { ... })",
    ":5: listen \"demo\": a listener of that name is already declared at line 4",
    ":6: listen \"other\": 0.0.0.0:9001 overlaps 127.0.0.1:9001 of the listener at line 4",
    ":7: listen \"same\": 127.0.0.1:9001 is already used by the listener at line 4",
    ":8: listen \"bad name\": the name must be 1 to 128 letters, digits, \"_\", \"-\" or \".\"",
    ":9: listen \"v6\": port is required",
    ":9: listen \"v6\": host must be an IPv4 or IPv6 address, such as \"0.0.0.0\", \"127.0.0.1\" or \"::\", got \"example.com\"",
    ":9: listen \"v6\": backlog must be an integer in 1..65535, got 0",
    ":9: listen \"v6\": unknown key 'prot' (did you mean 'port'?)",
    ":10: listen \"noport\": port is required",
    ":11: listen \"x\": expected a table after the name: listen { port = 8080 } or listen \"name\" { port = 8080 }, got \"y\"",
    NULL,
};

static const char *const bad_upstream_errors[] = {
    ":3: upstream \"empty\": no targets (list them: upstream \"name\" { \"host:port\", ... })",
    ":4: upstream \"targets\": target \"127.0.0.1\" must be host:port",
    ":4: upstream \"targets\": target \"http://x:80\" must be host:port, without a scheme",
    ":4: upstream \"targets\": target \"x:0\" must be host:port, with a port in 1..65535",
    ":4: upstream \"targets\": target \"-bad-.example:80\" must be host:port, with a valid host name or address",
    ":4: upstream \"targets\": target \"[zz]:80\" must be host:port, with an IPv6 host in [brackets]",
    ":4: upstream \"targets\": target \"10.0.0.256:80\" must be host:port, with a valid host name or address",
    ":4: upstream \"targets\": target \"10.0.0.2:80\": weight must be an integer >= 1, got 0",
    ":4: upstream \"targets\": a target table must start with \"host:port\", got nothing",
    ":4: upstream \"targets\": target \"10.0.0.3:80\": unknown key 'wieght' (did you mean 'weight'?)",
    ":4: upstream \"targets\": target \"10.0.0.3:80\": unexpected value \"extra\"",
    ":4: upstream \"targets\": a target must be \"host:port\" or { \"host:port\", weight = N }, got 42",
    ":4: upstream \"targets\": target \"a:1\" is listed twice (use weight = N instead)",
    ":9: upstream \"targets\": an upstream of that name is already declared at line 4",
    ":10: upstream \"both\": keepalive must be an integer >= 0, got -1",
    ":10: upstream \"both\": max_fails must be an integer >= 0, got \"3\"",
    ":10: upstream \"both\": timeout and read_timeout are the same setting; keep one",
    ":11: upstream \"bad/name\": the name must be 1 to 128 letters, digits, \"_\", \"-\" or \".\"",
    ":11: upstream \"bad/name\": connect_timeout must be a duration (seconds, or a string like \"250ms\", \"10s\", \"2m\", \"1h\"), got \"soon\"",
    ":11: upstream \"bad/name\": dns_ttl must be a duration (seconds, or a string like \"250ms\", \"10s\", \"2m\", \"1h\"), got \"1d\"",
    ":11: upstream \"bad/name\": unknown key 'bogus'",
    ":12: upstream needs a name: upstream \"name\" { \"host:port\", ... }, got a table",
    NULL,
};

static const char *const bad_route_errors[] = {
    ":4: route \"GET /a\": names no listener, and there is no default listener (add listen { port = ... }, or listen = \"name\" here)",
    ":4: route \"GET /a\": unknown upstream \"userz\" (did you mean \"users\"?)",
    ":5: route \"GET /b\": unknown listener \"dem\" (did you mean \"demo\"?)",
    ":6: route \"get /users/:id/:id/x*/*/y\": method \"get\" must be upper-case (GET)",
    ":6: route \"get /users/:id/:id/x*/*/y\": parameter :id appears twice",
    ":6: route \"get /users/:id/:id/x*/*/y\": * must be a whole segment (/prefix/*)",
    ":6: route \"get /users/:id/:id/x*/*/y\": * must be the last segment",
    ":7: route \"GET, /c\": empty method name in \"GET,\"",
    ":8: route \"G@T /d\": \"G@T\" is not a valid method name",
    ":9: route \"GET\": must be \"METHOD /path\", \"GET,POST /path\" or \"/path\"",
    ":10: route \"GET /e extra\": must be \"METHOD /path\", \"GET,POST /path\" or \"/path\"",
    ":11: route \"GET e\": the path \"e\" must start with /",
    ":12: route \"/f//g/./:/:1x?q=1\": the path must not contain a query or fragment (? or #)",
    ":12: route \"/f//g/./:/:1x?q=1\": empty path segment (//)",
    ":12: route \"/f//g/./:/:1x?q=1\": \".\" and \"..\" segments never match (request paths are normalised)",
    ":12: route \"/f//g/./:/:1x?q=1\": a parameter needs a name (:name)",
    ":12: route \"/f//g/./:/:1x?q=1\": parameter \":1x?q=1\" must be a name of letters, digits and _",
    ":13: route \"/h/:a/../:\": \".\" and \"..\" segments never match (request paths are normalised)",
    ":13: route \"/h/:a/../:\": a parameter needs a name (:name)",
    ":15: route \"GET,POST /users/:uid\": unknown key 'strp'",
    ":15: route \"GET,POST /users/:uid\": duplicates route \"GET /users/:id\" declared at line 14",
    ":16: route \"/i\": needs upstream = \"name\", respond = { status, body } or handler = function(req) ... end",
    ":17: route \"/j\": has more than one of upstream, respond and handler; keep one",
    ":18: unknown directive or variable 'print'",
    ":18: route \"/k\": respond status must be an integer in 200..599, got 99",
    ":18: route \"/k\": strip_prefix only applies to routes with an upstream",
    ":19: route \"/l\": respond: unexpected value 4 (respond = { status, body [, headers] })",
    ":19: route \"/l\": a 204 response cannot have a body",
    ":19: route \"/l\": respond header Content-Length is set by the gateway",
    ":19: route \"/l\": respond header X must not contain CR, LF or NUL",
    ":19: route \"/l\": respond header Y must be a string, got a table",
    ":19: route \"/l\": respond header name \"bad name\" is not a valid header name",
    ":20: route \"/m\": respond body: an array with holes cannot be encoded as JSON",
    ":21: route \"/n\": respond must be a table { status, body [, headers] }, got \"ok\"",
    ":22: route \"/o/*\": strip_prefix \"/p\" can never match the path \"/o/*\"",
    ":22: route \"/o/*\": rewrite uses :id, which the path does not capture",
    ":22: route \"/o/*\": strip_prefix and rewrite cannot both be set",
    ":23: route \"/:x\": strip_prefix = true, but the path has no literal prefix to strip",
    ":23: route \"/:x\": rewrite uses *, but the path does not end with /*",
    ":24: route \"/s\": host \"a.example.com:80\" must be a host name without port, like \"api.example.com\" or \"*.example.com\"",
    ":24: route \"/s\": host \"*\" must be a host name without port, like \"api.example.com\" or \"*.example.com\"",
    ":24: route \"/s\": host 5 must be a host name without port, like \"api.example.com\" or \"*.example.com\"",
    ":24: route \"/s\": host_header must be \"pass\", \"upstream\" or a host name, got \"two words\"",
    ":25: route \"/t\": max_body must be a size in bytes (a number, or a string like \"512\", \"16k\", \"1m\", \"1g\"), got \"big\"",
    ":26: route \"/u\": host is an empty list (leave host out to match any host)",
    ":26: route \"/u\": name \"dup\" is already used by the route at line 25",
    ":27: route \"/v\": has more than one of upstream, respond and handler; keep one",
    ":27: route \"/v\": upstream must be an upstream name, got 5",
    ":27: route \"/v\": respond body: a table key true cannot be encoded as JSON",
    ":28: route \"/w\": names no listener, and there is no default listener (add listen { port = ... }, or listen = \"name\" here)",
    ":29: route \"/x\": expected a table after the name: route \"GET /path\" { upstream = \"name\" }, got nothing",
    ":30: route \"/y\": missing its { ... } table",
    NULL,
};

static const char *const bad_syntax_errors[] = {
    ":3: unexpected symbol near ','",
    NULL,
};

static const char *const bad_runtime_errors[] = {
    ":2: listen: port must be an integer in 1..65535, got 0",
    ":5: attempt to index local 't' (a nil value)",
    NULL,
};

static const char *const bad_error_call_errors[] = {
    ":3: PORT must be set",
    NULL,
};

static const char *const bad_unknown_errors[] = {
    ":2: unknown directive or variable 'admn' (did you mean 'admin'?)",
    ":4: unknown directive or variable 'lisen' (did you mean 'listen'?)",
    ":5: gateway takes a table: gateway { ... }, got \"prod\"",
    ":6: limits takes a table: limits { ... }, got 5",
    ":7: upstream needs a name: upstream \"name\" { \"host:port\", ... }, got a table",
    ":8: route needs a name: route \"GET /path\" { upstream = \"name\" }, got 42",
    ":9: env: MG_TEST_NOT_A_NUMBER is \"abc\", which is not a number",
    ":10: env: the variable name must be a non-empty string, got nothing",
    NULL,
};

static const char *const bad_sandbox_errors[] = {
    ":3: unknown directive or variable 'io'",
    ":4: unknown directive or variable 'require'",
    ":5: unknown directive or variable 'print'",
    ":6: unknown directive or variable 'loadfile'",
    ":7: unknown directive or variable 'dofile'",
    ":8: unknown directive or variable '_G'",
    ":9: unknown directive or variable 'getfenv'",
    ":10: unknown directive or variable 'debug'",
    ":12: attempt to call field 'dump' (a nil value)",
    NULL,
};

static const char *const bad_nolisten_errors[] = {
    ": no listener is declared (add one, e.g. listen { port = 8080 })",
    NULL,
};

static void test_bad_gateway(void) { expect_errors(FIX "bad_gateway.lua", bad_gateway_errors); }
static void test_bad_listen(void) { expect_errors(FIX "bad_listen.lua", bad_listen_errors); }
static void test_bad_upstream(void) { expect_errors(FIX "bad_upstream.lua", bad_upstream_errors); }
static void test_bad_route(void) { expect_errors(FIX "bad_route.lua", bad_route_errors); }
static void test_bad_syntax(void) { expect_errors(FIX "bad_syntax.lua", bad_syntax_errors); }
static void test_bad_runtime(void) { expect_errors(FIX "bad_runtime.lua", bad_runtime_errors); }
static void test_bad_sandbox(void) { expect_errors(FIX "bad_sandbox.lua", bad_sandbox_errors); }
static void test_bad_nolisten(void) { expect_errors(FIX "bad_nolisten.lua", bad_nolisten_errors); }

static void test_bad_error_call(void)
{
  expect_errors(FIX "bad_error_call.lua", bad_error_call_errors);
}

static void test_bad_unknown(void)
{
  setenv("MG_TEST_NOT_A_NUMBER", "abc", 1);
  expect_errors(FIX "bad_unknown.lua", bad_unknown_errors);
}

static void test_bad_loop(void)
{
  char *errors = load_bad(FIX "bad_loop.lua");
  /* The line depends on where the step budget runs out: inside the loop, lines 3 to 4. */
  int ok = (strncmp(errors, FIX "bad_loop.lua:3: ", strlen(FIX) + 15) == 0 ||
            strncmp(errors, FIX "bad_loop.lua:4: ", strlen(FIX) + 15) == 0) &&
           strstr(errors, ": the config file ran too long (an endless loop?)\n") != NULL &&
           strchr(errors, '\n')[1] == '\0';
  if (!ok) fprintf(stderr, "got: %s", errors);
  free(errors);
  MG_CHECK(ok);
}

static void test_missing_file(void)
{
  char *errors = load_bad(FIX "does-not-exist.lua");
  int ok = strcmp(errors, FIX "does-not-exist.lua: cannot open the config file: "
                          "No such file or directory\n") == 0;
  if (!ok) fprintf(stderr, "got: %s", errors);
  free(errors);
  MG_CHECK(ok);
}

/* Writes TEXT to DIR/NAME and returns the path (static buffer). */
static const char *write_file(const char *dir, const char *name, const char *text, size_t len)
{
  static char path[PATH_MAX];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  FILE *f = fopen(path, "wb");
  if (!f) MG_FAIL("cannot write %s", path);
  fwrite(text, 1, len, f);
  fclose(f);
  return path;
}

static void test_bytecode_rejected(void)
{
  char dir[] = "/tmp/mg-test-config-XXXXXX";
  MG_CHECK(mkdtemp(dir) != NULL);
  const char *path = write_file(dir, "compiled.lua", "\033LJ\002\000listen", 10);
  char want[PATH_MAX + 80];
  snprintf(want, sizeof want, "%s: is a precompiled Lua file; only source text is accepted\n",
           path);
  char *errors = load_bad(path);
  int ok = strcmp(errors, want) == 0;
  if (!ok) fprintf(stderr, "got: %s", errors);
  free(errors);
  unlink(path);
  rmdir(dir);
  MG_CHECK(ok);
}

/* Lua shortens chunk names to 60 bytes in its messages; the loader shows the whole path. */
static void test_long_path(void)
{
  char dir[] = "/tmp/mg-test-config-XXXXXX";
  MG_CHECK(mkdtemp(dir) != NULL);
  char sub[PATH_MAX];
  snprintf(sub, sizeof sub, "%s/a-directory-name-long-enough-to-pass-lua-idsize", dir);
  MG_CHECK(mkdir(sub, 0700) == 0);
  static const char text[] = "listen { port = 8080 }\n\nlocal x = {} + 1\n";
  char path[PATH_MAX];
  snprintf(path, sizeof path, "%s", write_file(sub, "gateway.lua", text, sizeof text - 1));
  char want[PATH_MAX + 80];
  snprintf(want, sizeof want, "%s:3: attempt to perform arithmetic on a table value\n", path);
  char *errors = load_bad(path);
  int ok = strcmp(errors, want) == 0;
  if (!ok) fprintf(stderr, "got: %s", errors);
  free(errors);
  unlink(path);
  rmdir(sub);
  rmdir(dir);
  MG_CHECK(ok);
}

static void test_lua_dir_override(void)
{
  mg_config_t cfg;
  setenv("MOONGATE_LUA_DIR", "/nonexistent-moongate", 1);
  char *errors = load_bad(FIX "minimal.lua");
  unsetenv("MOONGATE_LUA_DIR");
  int ok = strncmp(errors, FIX "minimal.lua: cannot load the config checker: cannot open "
                           "/nonexistent-moongate/moongate/config.lua",
                   strlen(FIX) + 84) == 0;
  if (!ok) fprintf(stderr, "got: %s", errors);
  free(errors);
  MG_CHECK(ok);

  setenv("MOONGATE_LUA_DIR", "lua", 1);
  load_ok(FIX "minimal.lua", &cfg);
  unsetenv("MOONGATE_LUA_DIR");
  MG_CHECK_INT(cfg.listens[0].port, 8080);
  mg_config_free(&cfg);
}

int main(void)
{
  MG_RUN(test_defaults);
  MG_RUN(test_full);
  MG_RUN(test_routes);
  MG_RUN(test_program);
  MG_RUN(test_env);
  MG_RUN(test_free_zeroed);
  MG_RUN(test_loads_are_independent);
  MG_RUN(test_bad_gateway);
  MG_RUN(test_bad_listen);
  MG_RUN(test_bad_upstream);
  MG_RUN(test_bad_route);
  MG_RUN(test_bad_syntax);
  MG_RUN(test_bad_runtime);
  MG_RUN(test_bad_error_call);
  MG_RUN(test_bad_unknown);
  MG_RUN(test_bad_sandbox);
  MG_RUN(test_bad_nolisten);
  MG_RUN(test_bad_loop);
  MG_RUN(test_missing_file);
  MG_RUN(test_bytecode_rejected);
  MG_RUN(test_long_path);
  MG_RUN(test_lua_dir_override);
  return mg_test_summary();
}
