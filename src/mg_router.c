/* mg_router: picks the route for a request. mg_router_new compiles the routes of one listener
 * into host groups, each a segment trie; mg_router_match walks the group(s) that can serve the
 * request's host, most specific first, and inside a trie tries a literal child, then the
 * `:param` child, then the `*` routes of each node, backtracking when a branch dead-ends.
 *
 * Why a trie of segments: each edge consumes exactly one path segment, so a node is always
 * met at the same segment of the path and the walk visits each node at most once; matching
 * costs O(trie nodes on the path's branches), never an exponential backtrack, and needs no
 * allocation (the captures live on the caller's stack in a fixed array). The compiled router
 * is read-only, so every worker may match against it at once. */

#include "mg_router.h"
#include "mg_path.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NO_NODE UINT32_MAX

/* ------------------------------------------------------------------------------------------
 * Compiled structures
 * ---------------------------------------------------------------------------------------- */

/* A growable array of indices (children of a node, or routes ending at a node). */
typedef struct u32vec { uint32_t *v; uint32_t n, cap; } u32vec_t;

typedef struct rname { const char *p; size_t n; } rname_t;

/* One route of this listener, with what the walk needs at hand. */
typedef struct rroute {
  const mg_route_conf_t *conf;
  size_t index;              /* index in the array given to mg_router_new */
  unsigned methods;          /* MG_M_* bits; a route that names none has MG_METHOD_ANY */
  int named;                 /* named its methods: ranks before any-method routes */
  int star;                  /* ends with "*" */
  size_t nparams;            /* `:param` captures, "*" not counted */
  rname_t names[MG_ROUTER_MAX_PARAMS];
  char *segbuf;              /* the normalised literal segments; trie nodes point into it */
} rroute_t;

typedef struct rnode {
  const char *seg; size_t seg_len; /* the literal segment on the edge into this node */
  u32vec_t lit;              /* literal children, kept sorted by (length, bytes) */
  uint32_t param;            /* the `:param` child, or NO_NODE */
  u32vec_t ends;             /* routes whose pattern ends here, in rank order */
  u32vec_t stars;            /* routes whose pattern ends here with a "*" segment, in rank order */
  unsigned ends_methods, stars_methods; /* unions, to skip lists and fill 405's Allow */
} rnode_t;

/* Host groups: open addressing on the lower-cased name, sized once, never resized. */
typedef struct hostent { char *name; size_t len; uint32_t root; } hostent_t;
typedef struct hosttab { hostent_t *slots; size_t mask; size_t used; } hosttab_t;

struct mg_router {
  rroute_t *routes; size_t nroutes;
  rnode_t *nodes; uint32_t nnodes, cap;
  hosttab_t exact;           /* "api.example.com" */
  hosttab_t wild;            /* "*.example.com" stored as ".example.com" */
  uint32_t any_root;         /* routes for any host, or NO_NODE */
};

/* A pattern segment while compiling. */
typedef enum { SEG_LIT, SEG_PARAM, SEG_STAR } seg_kind_t;
typedef struct pseg { seg_kind_t kind; const char *p; size_t n; } pseg_t;

/* ------------------------------------------------------------------------------------------
 * Small helpers
 * ---------------------------------------------------------------------------------------- */

static unsigned char lower(unsigned char c) {
  return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

static int vec_insert(u32vec_t *a, uint32_t at, uint32_t x) {
  if (a->n == a->cap) {
    uint32_t cap = a->cap ? a->cap * 2 : 4;
    uint32_t *v = realloc(a->v, cap * sizeof *v);
    if (!v) return -1;
    a->v = v;
    a->cap = cap;
  }
  memmove(a->v + at + 1, a->v + at, (a->n - at) * sizeof *a->v);
  a->v[at] = x;
  a->n++;
  return 0;
}

static void set_error(char *err, size_t errlen, const mg_route_conf_t *rc, const char *msg) {
  if (!err || errlen == 0) return;
  const char *path = rc->path ? rc->path : "(none)";
  if (rc->file)
    snprintf(err, errlen, "%s:%d: route path \"%s\": %s", rc->file, rc->line, path, msg);
  else
    snprintf(err, errlen, "route path \"%s\": %s", path, msg);
}

/* ------------------------------------------------------------------------------------------
 * Host tables
 * ---------------------------------------------------------------------------------------- */

static uint64_t host_hash(const char *s, size_t n) {
  uint64_t h = 14695981039346656037ull; /* FNV-1a: short keys, good enough spread */
  for (size_t i = 0; i < n; i++) h = (h ^ lower((unsigned char)s[i])) * 1099511628211ull;
  return h;
}

static int host_eq(const char *a, const char *b, size_t n) {
  for (size_t i = 0; i < n; i++)
    if (lower((unsigned char)a[i]) != lower((unsigned char)b[i])) return 0;
  return 1;
}

static int hosttab_init(hosttab_t *t, size_t n) {
  size_t cap = 8;
  while (cap < n * 2) cap *= 2; /* at most half full, so probes stay short and end */
  t->slots = calloc(cap, sizeof *t->slots);
  t->mask = cap - 1;
  t->used = 0;
  return t->slots ? 0 : -1;
}

/* Returns the slot holding S, or the empty slot where it belongs. */
static hostent_t *hosttab_slot(const hosttab_t *t, const char *s, size_t n) {
  size_t i = (size_t)host_hash(s, n) & t->mask;
  for (;;) {
    hostent_t *e = &t->slots[i];
    if (!e->name || (e->len == n && host_eq(e->name, s, n))) return e;
    i = (i + 1) & t->mask;
  }
}

static uint32_t hosttab_find(const hosttab_t *t, const char *s, size_t n) {
  if (t->used == 0) return NO_NODE;
  const hostent_t *e = hosttab_slot(t, s, n);
  return e->name ? e->root : NO_NODE;
}

static void hosttab_dispose(hosttab_t *t) {
  if (!t->slots) return;
  for (size_t i = 0; i <= t->mask; i++) free(t->slots[i].name);
  free(t->slots);
  t->slots = NULL;
}

/* ------------------------------------------------------------------------------------------
 * Trie building
 * ---------------------------------------------------------------------------------------- */

static uint32_t node_new(mg_router_t *r, const char *seg, size_t seg_len) {
  if (r->nnodes == r->cap) {
    uint32_t cap = r->cap ? r->cap * 2 : 64;
    rnode_t *nodes = realloc(r->nodes, cap * sizeof *nodes);
    if (!nodes) return NO_NODE;
    r->nodes = nodes;
    r->cap = cap;
  }
  rnode_t *n = &r->nodes[r->nnodes];
  memset(n, 0, sizeof *n);
  n->seg = seg;
  n->seg_len = seg_len;
  n->param = NO_NODE;
  return r->nnodes++;
}

/* Order of literal children: by length, then bytes. Any total order serves binary search;
 * comparing lengths first settles most comparisons without touching the bytes. */
static int seg_cmp(const rnode_t *c, const char *s, size_t n) {
  if (c->seg_len != n) return c->seg_len < n ? -1 : 1;
  return memcmp(c->seg, s, n);
}

/* Finds the literal child of NODE for segment S: returns 1 and its position, or 0 and the
 * position where it would be inserted. */
static int lit_find(const mg_router_t *r, const rnode_t *node, const char *s, size_t n,
                    uint32_t *pos) {
  uint32_t lo = 0, hi = node->lit.n;
  while (lo < hi) {
    uint32_t mid = lo + (hi - lo) / 2;
    int c = seg_cmp(&r->nodes[node->lit.v[mid]], s, n);
    if (c == 0) { *pos = mid; return 1; }
    if (c < 0) lo = mid + 1; else hi = mid;
  }
  *pos = lo;
  return 0;
}

/* Adds route RI to a terminal list. Rank: routes that name their methods first, then the
 * any-method ones, each in declaration order (routes are added in that order), so the first
 * of two identical routes is always the one met first. */
static int rank_add(mg_router_t *r, u32vec_t *list, unsigned *methods, uint32_t ri) {
  uint32_t at = list->n;
  if (r->routes[ri].named) {
    at = 0;
    while (at < list->n && r->routes[list->v[at]].named) at++;
  }
  if (vec_insert(list, at, ri) < 0) return -1;
  *methods |= r->routes[ri].methods;
  return 0;
}

static int trie_add(mg_router_t *r, uint32_t root, uint32_t ri, const pseg_t *segs,
                    size_t nsegs) {
  uint32_t cur = root;
  for (size_t k = 0; k < nsegs; k++) {
    const pseg_t *s = &segs[k];
    if (s->kind == SEG_STAR) {
      rnode_t *n = &r->nodes[cur];
      return rank_add(r, &n->stars, &n->stars_methods, ri);
    }
    uint32_t next;
    if (s->kind == SEG_PARAM) {
      next = r->nodes[cur].param;
      if (next == NO_NODE) {
        if ((next = node_new(r, NULL, 0)) == NO_NODE) return -1;
        r->nodes[cur].param = next;
      }
    } else {
      uint32_t pos;
      if (lit_find(r, &r->nodes[cur], s->p, s->n, &pos)) {
        next = r->nodes[cur].lit.v[pos];
      } else {
        /* node_new may move r->nodes: take the parent's address only after it. */
        if ((next = node_new(r, s->p, s->n)) == NO_NODE) return -1;
        if (vec_insert(&r->nodes[cur].lit, pos, next) < 0) return -1;
      }
    }
    cur = next;
  }
  rnode_t *n = &r->nodes[cur];
  return rank_add(r, &n->ends, &n->ends_methods, ri);
}

/* Returns the root of the group for host pattern H, creating it; NO_NODE on error. */
static uint32_t group_root(mg_router_t *r, const char *h, const mg_route_conf_t *rc,
                           char *err, size_t errlen) {
  size_t len = h ? strlen(h) : 0;
  hosttab_t *t = &r->exact;
  if (len == 0) {
    set_error(err, errlen, rc, "empty host");
    return NO_NODE;
  }
  if (len == 1 && h[0] == '*') { /* "*" is spelled-out "any host" */
    if (r->any_root == NO_NODE && (r->any_root = node_new(r, NULL, 0)) == NO_NODE)
      set_error(err, errlen, rc, "out of memory");
    return r->any_root;
  }
  if (h[0] == '*') {
    if (h[1] != '.' || len < 3) {
      set_error(err, errlen, rc, "a wildcard host must look like \"*.example.com\"");
      return NO_NODE;
    }
    t = &r->wild;
    h++; /* keep the dot: the key is the suffix a matching host ends with */
    len--;
  }
  if (memchr(h, '*', len)) {
    set_error(err, errlen, rc, "'*' may only stand for the first labels of a host");
    return NO_NODE;
  }
  hostent_t *e = hosttab_slot(t, h, len);
  if (e->name) return e->root;
  uint32_t root = node_new(r, NULL, 0);
  char *name = malloc(len + 1);
  if (root == NO_NODE || !name) {
    free(name);
    set_error(err, errlen, rc, "out of memory");
    return NO_NODE;
  }
  for (size_t i = 0; i < len; i++) name[i] = (char)lower((unsigned char)h[i]);
  name[len] = '\0';
  e->name = name;
  e->len = len;
  e->root = root;
  t->used++;
  return root;
}

/* ------------------------------------------------------------------------------------------
 * Pattern compilation
 * ---------------------------------------------------------------------------------------- */

/* Splits RR's pattern into SEGS (room for one per '/'), normalising literal segments into
 * RR->segbuf with mg_path_normalize, so that "/caf%c3%a9" and "/%61dmin" are stored the way
 * a normalised request path spells them. Returns the count, or -1 with ERR set. */
static long pattern_parse(rroute_t *rr, pseg_t *segs, char *tmp, char *err, size_t errlen) {
  const mg_route_conf_t *rc = rr->conf;
  const char *path = rc->path;
  size_t nsegs = 0, off = 0;
  if (!path || path[0] != '/') {
    set_error(err, errlen, rc, "must start with '/'");
    return -1;
  }
  const char *p = path + 1;
  for (;;) {
    const char *end = strchr(p, '/');
    int last = end == NULL;
    size_t n = last ? strlen(p) : (size_t)(end - p);
    pseg_t *s = &segs[nsegs++];
    s->p = p;
    s->n = n;
    if (memchr(p, '*', n)) {
      if (n != 1 || !last) {
        set_error(err, errlen, rc, "'*' must be the whole last segment");
        return -1;
      }
      s->kind = SEG_STAR;
      rr->star = 1;
    } else if (n > 0 && p[0] == ':') {
      s->kind = SEG_PARAM;
      if (n == 1) {
        set_error(err, errlen, rc, "empty parameter name after ':'");
        return -1;
      }
      for (size_t k = 0; k < rr->nparams; k++) {
        if (rr->names[k].n == n - 1 && memcmp(rr->names[k].p, p + 1, n - 1) == 0) {
          set_error(err, errlen, rc, "duplicate parameter name");
          return -1;
        }
      }
      if (rr->nparams == MG_ROUTER_MAX_PARAMS) {
        set_error(err, errlen, rc, "too many parameters");
        return -1;
      }
      rr->names[rr->nparams].p = p + 1;
      rr->names[rr->nparams].n = n - 1;
      rr->nparams++;
    } else {
      s->kind = SEG_LIT;
      if (n == 0 && !last) {
        set_error(err, errlen, rc, "empty segment (\"//\")");
        return -1;
      }
      /* Normalise "/" + segment on its own: a dot segment comes back empty or fails, and
       * a pattern with one could never match a normalised path, so it is refused. */
      size_t outlen;
      tmp[0] = '/';
      memcpy(tmp + 1, p, n);
      if (mg_path_normalize(tmp, n + 1, rr->segbuf + off, &outlen) < 0 ||
          (outlen == 1 && n > 0)) {
        set_error(err, errlen, rc, "invalid segment (bad %-escape, control byte, '.' or '..')");
        return -1;
      }
      s->p = rr->segbuf + off + 1;
      s->n = outlen - 1;
      off += outlen + 1;
    }
    if (last) break;
    p = end + 1;
  }
  if (rr->star && rr->nparams == MG_ROUTER_MAX_PARAMS) {
    set_error(err, errlen, rc, "too many parameters");
    return -1;
  }
  return (long)nsegs;
}

/* Compiles route RI into every host group it serves. */
static int route_compile(mg_router_t *r, uint32_t ri, char *err, size_t errlen) {
  rroute_t *rr = &r->routes[ri];
  const mg_route_conf_t *rc = rr->conf;
  size_t plen = rc->path ? strlen(rc->path) : 0;
  size_t maxsegs = 1;
  for (size_t i = 0; i < plen; i++) maxsegs += rc->path[i] == '/';
  /* Each literal segment is stored as "/" + text + NUL: at most plen + 2 per segment. */
  rr->segbuf = malloc(plen + 2 * maxsegs + 2);
  pseg_t *segs = malloc(maxsegs * sizeof *segs);
  char *tmp = malloc(plen + 2);
  int rc_ok = -1;
  if (!rr->segbuf || !segs || !tmp) {
    set_error(err, errlen, rc, "out of memory");
    goto done;
  }
  long nsegs = pattern_parse(rr, segs, tmp, err, errlen);
  if (nsegs < 0) goto done;

  if (rc->nhosts == 0) {
    if (r->any_root == NO_NODE && (r->any_root = node_new(r, NULL, 0)) == NO_NODE) goto oom;
    if (trie_add(r, r->any_root, ri, segs, (size_t)nsegs) < 0) goto oom;
  }
  for (size_t h = 0; h < rc->nhosts; h++) {
    uint32_t root = group_root(r, rc->hosts[h], rc, err, errlen);
    if (root == NO_NODE) goto done; /* group_root said why */
    if (trie_add(r, root, ri, segs, (size_t)nsegs) < 0) goto oom;
  }
  rc_ok = 0;
  goto done;
oom:
  set_error(err, errlen, rc, "out of memory");
done:
  free(segs);
  free(tmp);
  return rc_ok;
}

/* ------------------------------------------------------------------------------------------
 * Life cycle
 * ---------------------------------------------------------------------------------------- */

static int serves(const mg_route_conf_t *rc, const char *listen) {
  if (!listen) return rc->listen == NULL;
  return rc->listen && strcmp(rc->listen, listen) == 0;
}

mg_router_t *mg_router_new(const mg_route_conf_t *routes, size_t nroutes, const char *listen,
                           char *err, size_t errlen) {
  if (err && errlen) err[0] = '\0';
  mg_router_t *r = calloc(1, sizeof *r);
  if (!r) goto oom;
  r->any_root = NO_NODE;

  size_t mine = 0, nhosts = 0;
  for (size_t i = 0; i < nroutes; i++) {
    if (!serves(&routes[i], listen)) continue;
    mine++;
    nhosts += routes[i].nhosts;
  }
  if (mine >= NO_NODE) {
    if (err && errlen) snprintf(err, errlen, "too many routes");
    goto fail;
  }
  if (mine && !(r->routes = calloc(mine, sizeof *r->routes))) goto oom;
  if (hosttab_init(&r->exact, nhosts) < 0 || hosttab_init(&r->wild, nhosts) < 0) goto oom;

  for (size_t i = 0; i < nroutes; i++) {
    const mg_route_conf_t *rc = &routes[i];
    if (!serves(rc, listen)) continue;
    uint32_t ri = (uint32_t)r->nroutes++;
    rroute_t *rr = &r->routes[ri];
    rr->conf = rc;
    rr->index = i;
    /* 0 can only come from a hand-made struct; read it as "no method named". */
    rr->methods = (rc->methods & MG_METHOD_ANY) ? (rc->methods & MG_METHOD_ANY) : MG_METHOD_ANY;
    rr->named = rr->methods != MG_METHOD_ANY;
    if (route_compile(r, ri, err, errlen) < 0) goto fail;
  }
  return r;

oom:
  if (err && errlen) snprintf(err, errlen, "out of memory");
fail:
  mg_router_free(r);
  return NULL;
}

void mg_router_free(mg_router_t *r) {
  if (!r) return;
  for (uint32_t i = 0; i < r->nnodes; i++) {
    free(r->nodes[i].lit.v);
    free(r->nodes[i].ends.v);
    free(r->nodes[i].stars.v);
  }
  free(r->nodes);
  for (size_t i = 0; i < r->nroutes; i++) free(r->routes[i].segbuf);
  free(r->routes);
  hosttab_dispose(&r->exact);
  hosttab_dispose(&r->wild);
  free(r);
}

/* ------------------------------------------------------------------------------------------
 * Matching
 * ---------------------------------------------------------------------------------------- */

/* The state of one walk; lives on the stack of mg_router_match. */
typedef struct walk {
  const mg_router_t *r;
  const char *path; size_t len;
  unsigned method;
  const char *val[MG_ROUTER_MAX_PARAMS]; size_t vlen[MG_ROUTER_MAX_PARAMS];
  unsigned allowed;          /* methods of every list whose pattern matched the path */
  uint32_t hit;              /* the chosen route */
  const char *rest; size_t rest_len;
} walk_t;

static int walk_list(walk_t *w, const u32vec_t *list, unsigned methods) {
  w->allowed |= methods;
  if (!(methods & w->method)) return 0;
  for (uint32_t i = 0; i < list->n; i++) {
    if (w->r->routes[list->v[i]].methods & w->method) {
      w->hit = list->v[i];
      return 1;
    }
  }
  return 0;
}

/* Matches from node NI. MORE says whether segments are left; if so the next one starts at
 * POS. NP is the number of `:param` values captured so far. Returns 1 on a hit. */
static int walk_node(walk_t *w, uint32_t ni, size_t pos, int more, size_t np) {
  const rnode_t *n = &w->r->nodes[ni];
  if (!more) {
    if (n->ends.n && walk_list(w, &n->ends, n->ends_methods)) {
      w->rest = NULL;
      w->rest_len = 0;
      return 1;
    }
    /* A prefix "/static/" + "*" also matches "/static": it names its own directory. */
    if (n->stars.n && walk_list(w, &n->stars, n->stars_methods)) {
      w->rest = w->path + w->len;
      w->rest_len = 0;
      return 1;
    }
    return 0;
  }
  const char *s = w->path + pos;
  const char *slash = memchr(s, '/', w->len - pos);
  size_t sn = slash ? (size_t)(slash - s) : w->len - pos;
  size_t next = pos + sn + 1;
  int next_more = slash != NULL;

  uint32_t at;
  if (n->lit.n && lit_find(w->r, n, s, sn, &at) &&
      walk_node(w, n->lit.v[at], next, next_more, np))
    return 1;
  if (n->param != NO_NODE && sn > 0 && np < MG_ROUTER_MAX_PARAMS) {
    w->val[np] = s;
    w->vlen[np] = sn;
    if (walk_node(w, n->param, next, next_more, np + 1)) return 1;
  }
  if (n->stars.n && walk_list(w, &n->stars, n->stars_methods)) {
    w->rest = s;
    w->rest_len = w->len - pos;
    return 1;
  }
  return 0;
}

/* Tries one host group. On a miss, remembers the Allow set of the first group that matched
 * the path at all: the most specific host tier is the one whose methods the client sees. */
static int walk_group(walk_t *w, uint32_t root, unsigned *first_allowed) {
  if (root == NO_NODE) return 0;
  w->allowed = 0;
  if (walk_node(w, root, 1, 1, 0)) return 1;
  if (!*first_allowed) *first_allowed = w->allowed;
  return 0;
}

mg_route_result_t mg_router_match(const mg_router_t *r, unsigned method, const char *host,
                                  size_t host_len, const char *path, size_t path_len,
                                  mg_route_match_t *m) {
  m->route = NULL;
  m->route_index = 0;
  m->nparams = 0;
  m->allowed_methods = 0;
  m->rest = NULL;
  m->rest_len = 0;
  if (!r || !path || path_len == 0 || path[0] != '/') return MG_ROUTE_NOT_FOUND;

  walk_t w;
  w.r = r;
  w.path = path;
  w.len = path_len;
  w.method = method;
  unsigned first_allowed = 0;
  int found = 0;

  if (host && host_len) {
    found = walk_group(&w, hosttab_find(&r->exact, host, host_len), &first_allowed);
    /* Suffixes from the left are longest first: "a.b.example.com" tries ".b.example.com"
     * before ".example.com". Starting at 1 keeps the bare suffix from matching itself. */
    for (size_t i = 1; !found && r->wild.used && i < host_len; i++) {
      if (host[i] != '.') continue;
      found = walk_group(&w, hosttab_find(&r->wild, host + i, host_len - i), &first_allowed);
    }
  }
  if (!found) found = walk_group(&w, r->any_root, &first_allowed);

  if (!found) {
    m->allowed_methods = first_allowed;
    return first_allowed ? MG_ROUTE_NO_METHOD : MG_ROUTE_NOT_FOUND;
  }
  const rroute_t *rr = &r->routes[w.hit];
  m->route = rr->conf;
  m->route_index = rr->index;
  m->allowed_methods = rr->methods;
  for (size_t k = 0; k < rr->nparams; k++) {
    m->params[k].name = rr->names[k].p;
    m->params[k].name_len = rr->names[k].n;
    m->params[k].value = w.val[k];
    m->params[k].value_len = w.vlen[k];
  }
  m->nparams = rr->nparams;
  if (rr->star) {
    m->params[m->nparams].name = "*";
    m->params[m->nparams].name_len = 1;
    m->params[m->nparams].value = w.rest;
    m->params[m->nparams].value_len = w.rest_len;
    m->nparams++;
    m->rest = w.rest;
    m->rest_len = w.rest_len;
  }
  return MG_ROUTE_FOUND;
}

/* ------------------------------------------------------------------------------------------
 * Methods
 * ---------------------------------------------------------------------------------------- */

static int is_tchar(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         (c && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

unsigned mg_router_method_bit(const char *name, size_t len) {
  static const struct { const char *name; size_t len; unsigned bit; } known[] = {
    {"GET", 3, MG_M_GET},       {"HEAD", 4, MG_M_HEAD},       {"POST", 4, MG_M_POST},
    {"PUT", 3, MG_M_PUT},       {"DELETE", 6, MG_M_DELETE},   {"PATCH", 5, MG_M_PATCH},
    {"OPTIONS", 7, MG_M_OPTIONS}, {"TRACE", 5, MG_M_TRACE},   {"CONNECT", 7, MG_M_CONNECT},
  };
  if (!name || len == 0) return 0;
  /* Method names are case-sensitive (RFC 9110 section 9.1): "get" is some other method. */
  for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
    if (known[i].len == len && memcmp(known[i].name, name, len) == 0) return known[i].bit;
  for (size_t i = 0; i < len; i++)
    if (!is_tchar((unsigned char)name[i])) return 0;
  return MG_M_OTHER;
}
