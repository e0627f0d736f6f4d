/* test_router: mg_router_new / mg_router_match / mg_router_method_bit. Each test builds a
 * small route table, matches concrete requests and asserts which route won, what was
 * captured, and the 404/405 outcome with its Allow set. */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mg_router.h"
#include "mg_test.h"

/* ------------------------------------------------------------------------------------------
 * Helpers
 * ---------------------------------------------------------------------------------------- */

#define ANY MG_METHOD_ANY
#define GET MG_M_GET
#define POST MG_M_POST
#define PUT MG_M_PUT
#define DEL MG_M_DELETE

#define MAXR 64

/* A route table under construction; routes point at string literals and static arrays. */
typedef struct table { mg_route_conf_t r[MAXR]; size_t n; } table_t;

static size_t add_route(table_t *t, unsigned methods, const char *path) {
  mg_route_conf_t *rc = &t->r[t->n];
  memset(rc, 0, sizeof *rc);
  rc->methods = methods;
  rc->path = (char *)path;
  rc->spec = (char *)path;
  return t->n++;
}

static size_t add_host_route(table_t *t, unsigned methods, const char *path, char **hosts,
                             size_t nhosts) {
  size_t i = add_route(t, methods, path);
  t->r[i].hosts = hosts;
  t->r[i].nhosts = nhosts;
  return i;
}

static mg_router_t *build(const table_t *t, const char *listen) {
  char err[256];
  mg_router_t *r = mg_router_new(t->r, t->n, listen, err, sizeof err);
  if (!r) fprintf(stderr, "  mg_router_new: %s\n", err);
  return r;
}

static mg_route_match_t m;

static int match(const mg_router_t *r, unsigned method, const char *host, const char *path) {
  return mg_router_match(r, method, host, host ? strlen(host) : 0, path, strlen(path), &m);
}

/* Asserts that METHOD HOST PATH selects route WANT (an index into the table). */
#define CHECK_ROUTE(r, method, host, path, want)                                       \
  do {                                                                                 \
    int rc_ = match(r, method, host, path);                                            \
    if (rc_ != MG_ROUTE_FOUND) MG_FAIL("%s: result %d, expected route %d", path, rc_,  \
                                       (int)(want));                                   \
    MG_CHECK_INT(m.route_index, want);                                                 \
    MG_CHECK(m.route != NULL);                                                         \
  } while (0)

#define CHECK_PARAM(k, want_name, want_value)                                          \
  do {                                                                                 \
    MG_CHECK((size_t)(k) < m.nparams);                                                 \
    MG_CHECK_MEM(m.params[k].name, m.params[k].name_len, want_name);                   \
    MG_CHECK_MEM(m.params[k].value, m.params[k].value_len, want_value);                \
  } while (0)

static void check_error(const table_t *t, const char *want_fragment) {
  char err[256] = "";
  mg_router_t *r = mg_router_new(t->r, t->n, NULL, err, sizeof err);
  if (r) {
    mg_router_free(r);
    MG_FAIL("expected an error containing \"%s\"", want_fragment);
  }
  if (!strstr(err, want_fragment)) MG_FAIL("error \"%s\" lacks \"%s\"", err, want_fragment);
}

/* ------------------------------------------------------------------------------------------
 * Patterns
 * ---------------------------------------------------------------------------------------- */

static void test_exact_paths(void) {
  table_t t = {0};
  add_route(&t, ANY, "/");
  add_route(&t, ANY, "/users");
  add_route(&t, ANY, "/users/");
  add_route(&t, ANY, "/users/all/active");
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, NULL, "/", 0);
  MG_CHECK_INT(m.nparams, 0);
  MG_CHECK(m.rest == NULL);
  CHECK_ROUTE(r, GET, NULL, "/users", 1);
  CHECK_ROUTE(r, GET, NULL, "/users/", 2);
  CHECK_ROUTE(r, GET, NULL, "/users/all/active", 3);
  MG_CHECK_INT(match(r, GET, NULL, "/users/all"), MG_ROUTE_NOT_FOUND);
  MG_CHECK_INT(match(r, GET, NULL, "/users/all/active/"), MG_ROUTE_NOT_FOUND);
  MG_CHECK_INT(match(r, GET, NULL, "/usersx"), MG_ROUTE_NOT_FOUND);
  MG_CHECK_INT(match(r, GET, NULL, "/user"), MG_ROUTE_NOT_FOUND);
  MG_CHECK_INT(m.allowed_methods, 0);
  MG_CHECK(m.route == NULL);
  /* Paths that were not normalised are not routes. */
  MG_CHECK_INT(match(r, GET, NULL, ""), MG_ROUTE_NOT_FOUND);
  MG_CHECK_INT(match(r, GET, NULL, "users"), MG_ROUTE_NOT_FOUND);
  mg_router_free(r);
}

static void test_params_captured(void) {
  table_t t = {0};
  add_route(&t, ANY, "/users/:id");
  add_route(&t, ANY, "/orgs/:org/repos/:repo");
  add_route(&t, ANY, "/files/:name/");
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, NULL, "/users/42", 0);
  MG_CHECK_INT(m.nparams, 1);
  CHECK_PARAM(0, "id", "42");
  MG_CHECK(m.rest == NULL);
  CHECK_ROUTE(r, GET, NULL, "/orgs/acme/repos/moongate", 1);
  MG_CHECK_INT(m.nparams, 2);
  CHECK_PARAM(0, "org", "acme");
  CHECK_PARAM(1, "repo", "moongate");
  /* A value keeps what normalisation kept: an encoded slash stays inside one segment. */
  CHECK_ROUTE(r, GET, NULL, "/users/a%2Fb", 0);
  CHECK_PARAM(0, "id", "a%2Fb");
  CHECK_ROUTE(r, GET, NULL, "/files/x.txt/", 2);
  CHECK_PARAM(0, "name", "x.txt");
  /* `:param` needs exactly one non-empty segment. */
  MG_CHECK_INT(match(r, GET, NULL, "/users/"), MG_ROUTE_NOT_FOUND);
  MG_CHECK_INT(match(r, GET, NULL, "/users"), MG_ROUTE_NOT_FOUND);
  MG_CHECK_INT(match(r, GET, NULL, "/users/42/x"), MG_ROUTE_NOT_FOUND);
  MG_CHECK_INT(match(r, GET, NULL, "/orgs/acme/repos/"), MG_ROUTE_NOT_FOUND);
  MG_CHECK_INT(match(r, GET, NULL, "/files/x.txt"), MG_ROUTE_NOT_FOUND);
  /* The values point into the path given to match. */
  const char *path = "/users/7";
  MG_CHECK_INT(mg_router_match(r, GET, NULL, 0, path, 8, &m), MG_ROUTE_FOUND);
  MG_CHECK(m.params[0].value == path + 7);
  mg_router_free(r);
}

static void test_prefix_star(void) {
  table_t t = {0};
  add_route(&t, ANY, "/static/*");
  add_route(&t, ANY, "/a/:x/*");
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, NULL, "/static", 0);
  MG_CHECK_INT(m.nparams, 1);
  CHECK_PARAM(0, "*", "");
  MG_CHECK(m.rest != NULL);
  MG_CHECK_INT(m.rest_len, 0);
  CHECK_ROUTE(r, GET, NULL, "/static/", 0);
  CHECK_PARAM(0, "*", "");
  MG_CHECK_MEM(m.rest, m.rest_len, "");
  CHECK_ROUTE(r, GET, NULL, "/static/a/b", 0);
  CHECK_PARAM(0, "*", "a/b");
  MG_CHECK_MEM(m.rest, m.rest_len, "a/b");
  CHECK_ROUTE(r, GET, NULL, "/static/css/site.css/", 0);
  MG_CHECK_MEM(m.rest, m.rest_len, "css/site.css/");
  MG_CHECK_INT(match(r, GET, NULL, "/staticx"), MG_ROUTE_NOT_FOUND);
  MG_CHECK_INT(match(r, GET, NULL, "/stati"), MG_ROUTE_NOT_FOUND);
  CHECK_ROUTE(r, GET, NULL, "/a/1/2/3", 1);
  MG_CHECK_INT(m.nparams, 2);
  CHECK_PARAM(0, "x", "1");
  CHECK_PARAM(1, "*", "2/3");
  CHECK_ROUTE(r, GET, NULL, "/a/1", 1);
  CHECK_PARAM(1, "*", "");
  mg_router_free(r);
}

static void test_catch_all_and_root(void) {
  table_t t = {0};
  add_route(&t, ANY, "/*");
  add_route(&t, ANY, "/");
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, NULL, "/", 1); /* the exact root beats the catch-all */
  CHECK_ROUTE(r, GET, NULL, "/anything/at/all", 0);
  MG_CHECK_MEM(m.rest, m.rest_len, "anything/at/all");
  CHECK_ROUTE(r, GET, NULL, "/x/", 0);
  MG_CHECK_MEM(m.rest, m.rest_len, "x/");
  mg_router_free(r);
}

static void test_patterns_normalised(void) {
  table_t t = {0};
  add_route(&t, ANY, "/%7euser/%61");
  add_route(&t, ANY, "/a%2fb");
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, NULL, "/~user/a", 0);
  CHECK_ROUTE(r, GET, NULL, "/a%2Fb", 1);
  MG_CHECK_INT(match(r, GET, NULL, "/a/b"), MG_ROUTE_NOT_FOUND);
  mg_router_free(r);
}

/* ------------------------------------------------------------------------------------------
 * Precedence
 * ---------------------------------------------------------------------------------------- */

static void test_literal_beats_param_beats_star(void) {
  table_t t = {0};
  /* Declared least specific first, so declaration order cannot explain the outcome. */
  add_route(&t, ANY, "/a/*");
  add_route(&t, ANY, "/a/:x");
  add_route(&t, ANY, "/a/b");
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, NULL, "/a/b", 2);
  CHECK_ROUTE(r, GET, NULL, "/a/c", 1);
  CHECK_PARAM(0, "x", "c");
  CHECK_ROUTE(r, GET, NULL, "/a/c/d", 0);
  MG_CHECK_MEM(m.rest, m.rest_len, "c/d");
  CHECK_ROUTE(r, GET, NULL, "/a", 0);
  CHECK_ROUTE(r, GET, NULL, "/a/", 0);
  mg_router_free(r);
}

static void test_longer_prefix_wins(void) {
  table_t t = {0};
  add_route(&t, ANY, "/a/*");
  add_route(&t, ANY, "/a/b/*");
  add_route(&t, ANY, "/a/b/c/*");
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, NULL, "/a/b/c/d", 2);
  MG_CHECK_MEM(m.rest, m.rest_len, "d");
  CHECK_ROUTE(r, GET, NULL, "/a/b/x", 1);
  MG_CHECK_MEM(m.rest, m.rest_len, "x");
  CHECK_ROUTE(r, GET, NULL, "/a/b", 1);
  CHECK_ROUTE(r, GET, NULL, "/a/bc", 0);
  MG_CHECK_MEM(m.rest, m.rest_len, "bc");
  mg_router_free(r);
}

static void test_backtracking(void) {
  table_t t = {0};
  add_route(&t, ANY, "/a/:x/c");
  add_route(&t, ANY, "/a/b/d");
  add_route(&t, ANY, "/p/q/r/s");
  add_route(&t, ANY, "/p/*");
  add_route(&t, ANY, "/m/:x/:y/z");
  add_route(&t, ANY, "/m/n/:y/w");
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, NULL, "/a/b/c", 0);
  CHECK_PARAM(0, "x", "b");
  CHECK_ROUTE(r, GET, NULL, "/a/b/d", 1);
  MG_CHECK_INT(m.nparams, 0);
  /* Dead end three literals deep falls back to the prefix at the top. */
  CHECK_ROUTE(r, GET, NULL, "/p/q/r/t", 3);
  MG_CHECK_MEM(m.rest, m.rest_len, "q/r/t");
  CHECK_ROUTE(r, GET, NULL, "/p/q/r/s", 2);
  /* The literal branch captured y=o before failing; the param branch recaptures it. */
  CHECK_ROUTE(r, GET, NULL, "/m/n/o/z", 4);
  MG_CHECK_INT(m.nparams, 2);
  CHECK_PARAM(0, "x", "n");
  CHECK_PARAM(1, "y", "o");
  CHECK_ROUTE(r, GET, NULL, "/m/n/o/w", 5);
  MG_CHECK_INT(m.nparams, 1);
  CHECK_PARAM(0, "y", "o");
  mg_router_free(r);
}

static void test_method_is_a_filter_then_backtracks(void) {
  table_t t = {0};
  add_route(&t, GET, "/u/me");
  add_route(&t, POST, "/u/:id");
  add_route(&t, PUT, "/u/*");
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, NULL, "/u/me", 0);
  CHECK_ROUTE(r, POST, NULL, "/u/me", 1);
  CHECK_PARAM(0, "id", "me");
  CHECK_ROUTE(r, PUT, NULL, "/u/me", 2);
  MG_CHECK_MEM(m.rest, m.rest_len, "me");
  MG_CHECK_INT(match(r, DEL, NULL, "/u/me"), MG_ROUTE_NO_METHOD);
  MG_CHECK_INT(m.allowed_methods, GET | POST | PUT);
  MG_CHECK_INT(match(r, GET, NULL, "/u/you"), MG_ROUTE_NO_METHOD);
  MG_CHECK_INT(m.allowed_methods, POST | PUT);
  mg_router_free(r);
}

static void test_named_method_beats_any(void) {
  table_t t = {0};
  add_route(&t, ANY, "/x");
  add_route(&t, GET, "/x");
  add_route(&t, GET | POST, "/x");
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, NULL, "/x", 1);
  MG_CHECK_INT(m.allowed_methods, GET);
  CHECK_ROUTE(r, POST, NULL, "/x", 2);
  CHECK_ROUTE(r, DEL, NULL, "/x", 0);
  MG_CHECK_INT(m.allowed_methods, ANY);
  CHECK_ROUTE(r, MG_M_OTHER, NULL, "/x", 0);
  mg_router_free(r);
}

static void test_first_declared_wins(void) {
  table_t t = {0};
  add_route(&t, GET, "/d");
  add_route(&t, GET, "/d");
  add_route(&t, ANY, "/u/:id");
  add_route(&t, ANY, "/u/:uid");
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, NULL, "/d", 0);
  CHECK_ROUTE(r, GET, NULL, "/u/5", 2);
  CHECK_PARAM(0, "id", "5");
  mg_router_free(r);
}

/* ------------------------------------------------------------------------------------------
 * 404 and 405
 * ---------------------------------------------------------------------------------------- */

static void test_not_found_and_method_not_allowed(void) {
  table_t t = {0};
  add_route(&t, GET, "/a/:x");
  add_route(&t, PUT, "/a/b");
  add_route(&t, POST | DEL, "/a/*");
  add_route(&t, POST, "/other");
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  /* Allow gathers every route whose pattern matches, whatever its specificity. */
  MG_CHECK_INT(match(r, MG_M_PATCH, NULL, "/a/b"), MG_ROUTE_NO_METHOD);
  MG_CHECK_INT(m.allowed_methods, GET | PUT | POST | DEL);
  MG_CHECK(m.route == NULL);
  MG_CHECK_INT(m.nparams, 0);
  MG_CHECK_INT(match(r, MG_M_PATCH, NULL, "/a/c"), MG_ROUTE_NO_METHOD);
  MG_CHECK_INT(m.allowed_methods, GET | POST | DEL);
  MG_CHECK_INT(match(r, MG_M_PATCH, NULL, "/a/c/d"), MG_ROUTE_NO_METHOD);
  MG_CHECK_INT(m.allowed_methods, POST | DEL);
  MG_CHECK_INT(match(r, GET, NULL, "/other"), MG_ROUTE_NO_METHOD);
  MG_CHECK_INT(m.allowed_methods, POST);
  MG_CHECK_INT(match(r, GET, NULL, "/nothing"), MG_ROUTE_NOT_FOUND);
  MG_CHECK_INT(m.allowed_methods, 0);
  /* An invalid method (bit 0) matches nothing, but the path still exists. */
  MG_CHECK_INT(match(r, 0, NULL, "/other"), MG_ROUTE_NO_METHOD);
  mg_router_free(r);
}

static void test_empty_router(void) {
  table_t t = {0};
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  MG_CHECK_INT(match(r, GET, "example.com", "/"), MG_ROUTE_NOT_FOUND);
  mg_router_free(r);
  mg_router_free(NULL);
}

/* ------------------------------------------------------------------------------------------
 * Hosts
 * ---------------------------------------------------------------------------------------- */

static char *h_wild[] = {"*.example.com"};
static char *h_wild_api[] = {"*.api.example.com"};
static char *h_api[] = {"api.example.com"};
static char *h_two[] = {"one.test", "TWO.test"};
static char *h_star[] = {"*"};

static void test_host_tiers(void) {
  table_t t = {0};
  add_route(&t, ANY, "/p");                            /* 0: any host */
  add_host_route(&t, ANY, "/p", h_wild, 1);            /* 1 */
  add_host_route(&t, ANY, "/p", h_wild_api, 1);        /* 2: longer suffix */
  add_host_route(&t, ANY, "/p", h_api, 1);             /* 3: exact */
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, "api.example.com", "/p", 3);
  CHECK_ROUTE(r, GET, "API.Example.COM", "/p", 3);
  CHECK_ROUTE(r, GET, "x.api.example.com", "/p", 2);
  CHECK_ROUTE(r, GET, "a.b.api.example.com", "/p", 2);
  CHECK_ROUTE(r, GET, "x.example.com", "/p", 1);
  CHECK_ROUTE(r, GET, "a.b.example.com", "/p", 1);
  CHECK_ROUTE(r, GET, "X.EXAMPLE.COM", "/p", 1);
  /* The wildcard needs at least one label before the suffix. */
  CHECK_ROUTE(r, GET, "example.com", "/p", 0);
  CHECK_ROUTE(r, GET, ".example.com", "/p", 0);
  CHECK_ROUTE(r, GET, "xexample.com", "/p", 0);
  CHECK_ROUTE(r, GET, "example.com.evil.org", "/p", 0);
  CHECK_ROUTE(r, GET, "other.org", "/p", 0);
  CHECK_ROUTE(r, GET, NULL, "/p", 0);
  CHECK_ROUTE(r, GET, "", "/p", 0);
  mg_router_free(r);
}

static void test_host_beats_path_specificity(void) {
  table_t t = {0};
  add_route(&t, ANY, "/p");                            /* 0 */
  add_host_route(&t, ANY, "/*", h_api, 1);             /* 1 */
  add_host_route(&t, ANY, "/only-here", h_wild, 1);    /* 2 */
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, "api.example.com", "/p", 1);
  MG_CHECK_MEM(m.rest, m.rest_len, "p");
  CHECK_ROUTE(r, GET, "www.example.com", "/p", 0); /* its tier has no "/p": fall through */
  CHECK_ROUTE(r, GET, "www.example.com", "/only-here", 2);
  MG_CHECK_INT(match(r, GET, "example.com", "/only-here"), MG_ROUTE_NOT_FOUND);
  mg_router_free(r);
}

static void test_host_method_fallthrough_and_allow(void) {
  table_t t = {0};
  add_host_route(&t, GET, "/m", h_api, 1);             /* 0 */
  add_host_route(&t, PUT, "/m", h_wild, 1);            /* 1 */
  add_route(&t, POST, "/m");                           /* 2 */
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, "api.example.com", "/m", 0);
  CHECK_ROUTE(r, PUT, "api.example.com", "/m", 1);
  CHECK_ROUTE(r, POST, "api.example.com", "/m", 2);
  /* 405's Allow comes from the most specific tier in which the path matched. */
  MG_CHECK_INT(match(r, DEL, "api.example.com", "/m"), MG_ROUTE_NO_METHOD);
  MG_CHECK_INT(m.allowed_methods, GET);
  MG_CHECK_INT(match(r, DEL, "w.example.com", "/m"), MG_ROUTE_NO_METHOD);
  MG_CHECK_INT(m.allowed_methods, PUT);
  MG_CHECK_INT(match(r, DEL, "other.org", "/m"), MG_ROUTE_NO_METHOD);
  MG_CHECK_INT(m.allowed_methods, POST);
  MG_CHECK_INT(match(r, GET, "other.org", "/n"), MG_ROUTE_NOT_FOUND);
  mg_router_free(r);
}

static void test_several_hosts_and_star_host(void) {
  table_t t = {0};
  add_host_route(&t, ANY, "/h", h_two, 2);             /* 0 */
  add_host_route(&t, ANY, "/s", h_star, 1);            /* 1: "*" = any host */
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, "one.test", "/h", 0);
  CHECK_ROUTE(r, GET, "two.test", "/h", 0);
  MG_CHECK_INT(match(r, GET, "three.test", "/h"), MG_ROUTE_NOT_FOUND);
  MG_CHECK_INT(match(r, GET, NULL, "/h"), MG_ROUTE_NOT_FOUND);
  CHECK_ROUTE(r, GET, "anything.org", "/s", 1);
  CHECK_ROUTE(r, GET, NULL, "/s", 1);
  mg_router_free(r);
}

/* ------------------------------------------------------------------------------------------
 * Listeners, errors, methods
 * ---------------------------------------------------------------------------------------- */

static void test_listener_filtering(void) {
  table_t t = {0};
  add_route(&t, GET, "/users/:id");                    /* 0: default listener */
  add_route(&t, GET, "/users/:id");                    /* 1: demo */
  t.r[1].listen = "demo";
  add_route(&t, GET, "/demo-only");                    /* 2: demo */
  t.r[2].listen = "demo";
  add_route(&t, GET, "/other");                        /* 3: another listener */
  t.r[3].listen = "admin2";
  mg_router_t *def = build(&t, NULL), *demo = build(&t, "demo");
  MG_CHECK(def != NULL && demo != NULL);
  CHECK_ROUTE(def, GET, NULL, "/users/1", 0);
  MG_CHECK_INT(match(def, GET, NULL, "/demo-only"), MG_ROUTE_NOT_FOUND);
  MG_CHECK_INT(match(def, GET, NULL, "/other"), MG_ROUTE_NOT_FOUND);
  /* route_index stays an index into the whole array. */
  CHECK_ROUTE(demo, GET, NULL, "/users/1", 1);
  MG_CHECK(m.route == &t.r[1]);
  CHECK_ROUTE(demo, GET, NULL, "/demo-only", 2);
  MG_CHECK_INT(match(demo, GET, NULL, "/other"), MG_ROUTE_NOT_FOUND);
  mg_router_free(def);
  mg_router_free(demo);
  mg_router_t *none = build(&t, "nobody");
  MG_CHECK(none != NULL);
  MG_CHECK_INT(match(none, GET, NULL, "/users/1"), MG_ROUTE_NOT_FOUND);
  mg_router_free(none);
}

static void test_pattern_errors(void) {
  static const struct { const char *path; const char *msg; } bad[] = {
    {"users", "must start with '/'"},
    {"", "must start with '/'"},
    {"/a/*/b", "'*' must be the whole last segment"},
    {"/a*", "'*' must be the whole last segment"},
    {"/a/*x", "'*' must be the whole last segment"},
    {"/a/:", "empty parameter name"},
    {"/a/:/b", "empty parameter name"},
    {"/a/:x/:x", "duplicate parameter name"},
    {"/a//b", "empty segment"},
    {"/a/./b", "invalid segment"},
    {"/a/../b", "invalid segment"},
    {"/%2e%2e", "invalid segment"},
    {"/%zz", "invalid segment"},
    {"/a%00", "invalid segment"},
    {"/:a/:b/:c/:d/:e/:f/:g/:h/:i/:j/:k/:l/:m/:n/:o/:p/:q", "too many parameters"},
    {"/:a/:b/:c/:d/:e/:f/:g/:h/:i/:j/:k/:l/:m/:n/:o/:p/*", "too many parameters"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    table_t t = {0};
    add_route(&t, ANY, "/fine");
    add_route(&t, ANY, bad[i].path);
    check_error(&t, bad[i].msg);
  }
  table_t t = {0};
  add_route(&t, ANY, NULL);
  check_error(&t, "must start with '/'");

  /* The message names file:line when the config gave them. */
  t.n = 0;
  add_route(&t, ANY, "/x/*/y");
  t.r[0].file = "gateway.lua";
  t.r[0].line = 12;
  check_error(&t, "gateway.lua:12: route path \"/x/*/y\"");

  static char *bad_hosts[][1] = {{""}, {"*example.com"}, {"a.*.com"}, {"*."}, {NULL}};
  for (size_t i = 0; i < sizeof bad_hosts / sizeof bad_hosts[0]; i++) {
    t.n = 0;
    add_host_route(&t, ANY, "/h", bad_hosts[i], 1);
    check_error(&t, "host");
  }
  /* The limits themselves are fine: 16 params, or 15 and a star. */
  t.n = 0;
  add_route(&t, ANY, "/:a/:b/:c/:d/:e/:f/:g/:h/:i/:j/:k/:l/:m/:n/:o/:p");
  add_route(&t, ANY, "/s/:a/:b/:c/:d/:e/:f/:g/:h/:i/:j/:k/:l/:m/:n/:o/*");
  mg_router_t *r = build(&t, NULL);
  MG_CHECK(r != NULL);
  CHECK_ROUTE(r, GET, NULL, "/1/2/3/4/5/6/7/8/9/10/11/12/13/14/15/16", 0);
  MG_CHECK_INT(m.nparams, 16);
  CHECK_PARAM(15, "p", "16");
  CHECK_ROUTE(r, GET, NULL, "/s/1/2/3/4/5/6/7/8/9/10/11/12/13/14/15/x/y", 1);
  MG_CHECK_INT(m.nparams, 16);
  CHECK_PARAM(14, "o", "15");
  CHECK_PARAM(15, "*", "x/y");
  mg_router_free(r);
}

static void test_method_bits(void) {
  MG_CHECK_INT(mg_router_method_bit("GET", 3), MG_M_GET);
  MG_CHECK_INT(mg_router_method_bit("HEAD", 4), MG_M_HEAD);
  MG_CHECK_INT(mg_router_method_bit("POST", 4), MG_M_POST);
  MG_CHECK_INT(mg_router_method_bit("PUT", 3), MG_M_PUT);
  MG_CHECK_INT(mg_router_method_bit("DELETE", 6), MG_M_DELETE);
  MG_CHECK_INT(mg_router_method_bit("PATCH", 5), MG_M_PATCH);
  MG_CHECK_INT(mg_router_method_bit("OPTIONS", 7), MG_M_OPTIONS);
  MG_CHECK_INT(mg_router_method_bit("TRACE", 5), MG_M_TRACE);
  MG_CHECK_INT(mg_router_method_bit("CONNECT", 7), MG_M_CONNECT);
  MG_CHECK_INT(mg_router_method_bit("PURGE", 5), MG_M_OTHER);
  MG_CHECK_INT(mg_router_method_bit("M-SEARCH", 8), MG_M_OTHER);
  MG_CHECK_INT(mg_router_method_bit("get", 3), MG_M_OTHER);   /* case-sensitive */
  MG_CHECK_INT(mg_router_method_bit("GETX", 3), MG_M_GET);    /* only LEN bytes count */
  MG_CHECK_INT(mg_router_method_bit("GE", 2), MG_M_OTHER);
  MG_CHECK_INT(mg_router_method_bit("", 0), 0);
  MG_CHECK_INT(mg_router_method_bit(NULL, 0), 0);
  MG_CHECK_INT(mg_router_method_bit("GE T", 4), 0);
  MG_CHECK_INT(mg_router_method_bit("G\0T", 3), 0);
  MG_CHECK_INT(mg_router_method_bit("GET/", 4), 0);
}

/* ------------------------------------------------------------------------------------------
 * Scale
 * ---------------------------------------------------------------------------------------- */

static void test_thousand_routes(void) {
  enum { N = 1000 };
  /* Per i: "GET /svc<i>/items/:id", an any-method prefix under "/svc<i>/", "GET /flat/r<i>"
   * and, for every tenth i, "GET /svc<i>/items/:key" on host "h<i>.test". */
  size_t total = N * 3 + N / 10;
  mg_route_conf_t *routes = calloc(total, sizeof *routes);
  char (*paths)[48] = calloc(total, sizeof *paths);
  char (*hostnames)[24] = calloc(N, sizeof *hostnames);
  char **hostptrs = calloc(N, sizeof *hostptrs);
  MG_CHECK(routes && paths && hostnames && hostptrs);
  size_t n = 0;
  for (int i = 0; i < N; i++) {
    snprintf(paths[n], sizeof paths[n], "/svc%d/items/:id", i);
    routes[n].path = paths[n]; routes[n].methods = GET; n++;
    snprintf(paths[n], sizeof paths[n], "/svc%d/*", i);
    routes[n].path = paths[n]; routes[n].methods = ANY; n++;
    snprintf(paths[n], sizeof paths[n], "/flat/r%d", i);
    routes[n].path = paths[n]; routes[n].methods = GET; n++;
    if (i % 10 == 0) {
      snprintf(hostnames[i], sizeof hostnames[i], "h%d.test", i);
      hostptrs[i] = hostnames[i];
      snprintf(paths[n], sizeof paths[n], "/svc%d/items/:key", i);
      routes[n].path = paths[n]; routes[n].methods = GET;
      routes[n].hosts = &hostptrs[i]; routes[n].nhosts = 1; n++;
    }
  }
  MG_CHECK_INT(n, total);
  char err[256];
  mg_router_t *r = mg_router_new(routes, n, NULL, err, sizeof err);
  MG_CHECK(r != NULL);

  char path[64], host[32], val[16];
  for (int i = 0; i < N; i++) {
    size_t base = (size_t)i * 3 + (size_t)(i + 9) / 10; /* routes before i's first one */
    snprintf(path, sizeof path, "/svc%d/items/%d", i, i * 7);
    snprintf(val, sizeof val, "%d", i * 7);
    CHECK_ROUTE(r, GET, NULL, path, base);
    CHECK_PARAM(0, "id", val);
    CHECK_ROUTE(r, POST, NULL, path, base + 1);
    snprintf(val, sizeof val, "items/%d", i * 7);
    MG_CHECK_MEM(m.rest, m.rest_len, val);
    snprintf(path, sizeof path, "/flat/r%d", i);
    CHECK_ROUTE(r, GET, NULL, path, base + 2);
    MG_CHECK_INT(match(r, POST, NULL, path), MG_ROUTE_NO_METHOD);
    MG_CHECK_INT(m.allowed_methods, GET);
    snprintf(path, sizeof path, "/svc%d/items/x", i);
    snprintf(host, sizeof host, "h%d.test", i);
    CHECK_ROUTE(r, GET, host, path, i % 10 == 0 ? base + 3 : base);
    CHECK_PARAM(0, i % 10 == 0 ? "key" : "id", "x");
  }
  MG_CHECK_INT(match(r, GET, NULL, "/flat/r1000"), MG_ROUTE_NOT_FOUND);
  MG_CHECK_INT(match(r, GET, NULL, "/svc1000/items/1"), MG_ROUTE_NOT_FOUND);
  mg_router_free(r);
  free(routes);
  free(paths);
  free(hostnames);
  free(hostptrs);
}

int main(void) {
  MG_RUN(test_exact_paths);
  MG_RUN(test_params_captured);
  MG_RUN(test_prefix_star);
  MG_RUN(test_catch_all_and_root);
  MG_RUN(test_patterns_normalised);
  MG_RUN(test_literal_beats_param_beats_star);
  MG_RUN(test_longer_prefix_wins);
  MG_RUN(test_backtracking);
  MG_RUN(test_method_is_a_filter_then_backtracks);
  MG_RUN(test_named_method_beats_any);
  MG_RUN(test_first_declared_wins);
  MG_RUN(test_not_found_and_method_not_allowed);
  MG_RUN(test_empty_router);
  MG_RUN(test_host_tiers);
  MG_RUN(test_host_beats_path_specificity);
  MG_RUN(test_host_method_fallthrough_and_allow);
  MG_RUN(test_several_hosts_and_star_host);
  MG_RUN(test_listener_filtering);
  MG_RUN(test_pattern_errors);
  MG_RUN(test_method_bits);
  MG_RUN(test_thousand_routes);
  return mg_test_summary();
}
