/* mg_resolver: non-blocking name resolution for upstream targets, with a per-worker cache.
 *
 * Three objects: an entry per "host:port" holds the last answer; a query is one
 * uv_getaddrinfo call in flight for an entry; a waiter is one caller waiting on a query (the
 * handle mg_resolver_resolve gives out). Every caller that asks for a name while its query
 * runs joins that query, so a burst of requests to a cold upstream costs one lookup.
 *
 * A query can outlive everything else: libuv runs getaddrinfo on its thread pool and always
 * calls back on the loop, even when the resolver is gone. So a query is freed only in its own
 * callback; the resolver, when freed first, merely orphans it (query->r = NULL). */
#include "mg_resolver.h"

#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
  MG_RESOLVER_BUCKETS = 64,        /* hash buckets; names come mostly from the config */
  MG_RESOLVER_MAX_ENTRIES = 1024,  /* scripts may fetch arbitrary hosts: bound the cache */
  MG_RESOLVER_NEGATIVE_MS = 1000,  /* a failure is remembered at most this long */
};

typedef struct mg_query mg_query_t;

typedef struct mg_waiter {
  struct mg_waiter *prev, *next;
  mg_query_t *query;
  mg_resolve_cb cb;
  void *data;
} mg_waiter_t;

typedef struct mg_entry {
  struct mg_entry *next;           /* hash chain */
  mg_query_t *query;               /* the lookup in flight, or NULL */
  int has_answer;
  int status;                      /* 0, or the negative libuv error of the last lookup */
  struct sockaddr_storage addr;    /* valid when has_answer and status == 0 */
  uint64_t answered_ms;            /* loop time of the answer */
  uint64_t keep_ms;                /* how long the answer was asked to live, for eviction */
  uint64_t ttl_ms;                 /* TTL of the call that started the query */
  char *host;                      /* the name as getaddrinfo wants it */
  char service[8];                 /* the port, as text */
  char key[];                      /* "host:port" */
} mg_entry_t;

struct mg_query {
  uv_getaddrinfo_t req;
  mg_resolver_t *r;                /* NULL once the resolver is freed: the query is orphaned */
  mg_entry_t *entry;
  mg_waiter_t *waiters, *last;     /* a doubly linked list, called back first to last */
};

struct mg_resolver {
  uv_loop_t *loop;
  mg_entry_t *buckets[MG_RESOLVER_BUCKETS];
  size_t nentries;
  int dispatching;                 /* > 0 while callbacks run from on_resolved */
  int free_pending;                /* mg_resolver_free was called during a dispatch */
};

/* ---------------------------------------------------------------------------------------
 * Entries
 * ------------------------------------------------------------------------------------- */

static uint32_t hash_key(const char *s) {
  uint32_t h = 2166136261u; /* FNV-1a */
  for (; *s; s++) h = (h ^ (unsigned char)*s) * 16777619u;
  return h;
}

static mg_entry_t **bucket_of(mg_resolver_t *r, const char *key) {
  return &r->buckets[hash_key(key) % MG_RESOLVER_BUCKETS];
}

static mg_entry_t *entry_find(mg_resolver_t *r, const char *key) {
  for (mg_entry_t *e = *bucket_of(r, key); e; e = e->next) {
    if (strcmp(e->key, key) == 0) return e;
  }
  return NULL;
}

static void entry_unlink(mg_resolver_t *r, mg_entry_t *e) {
  for (mg_entry_t **pp = bucket_of(r, e->key); *pp; pp = &(*pp)->next) {
    if (*pp == e) {
      *pp = e->next;
      r->nentries--;
      return;
    }
  }
}

static void entry_free(mg_entry_t *e) {
  free(e->host);
  free(e);
}

/* Makes room for one more entry when the cache is full: drops the answers that have run
 * out, or failing that, one idle entry (the cache is a convenience; a dropped name is simply
 * looked up again). Entries with a query in flight are never dropped. */
static void cache_make_room(mg_resolver_t *r) {
  if (r->nentries < MG_RESOLVER_MAX_ENTRIES) return;
  uint64_t now = uv_now(r->loop);
  mg_entry_t *idle = NULL;
  for (size_t b = 0; b < MG_RESOLVER_BUCKETS; b++) {
    for (mg_entry_t **pp = &r->buckets[b]; *pp;) {
      mg_entry_t *e = *pp;
      if (!e->query && now - e->answered_ms >= e->keep_ms) {
        *pp = e->next;
        r->nentries--;
        entry_free(e);
        continue;
      }
      if (!e->query && !idle) idle = e;
      pp = &e->next;
    }
  }
  if (r->nentries >= MG_RESOLVER_MAX_ENTRIES && idle) {
    entry_unlink(r, idle);
    entry_free(idle);
  }
}

static mg_entry_t *entry_new(mg_resolver_t *r, const char *key, const char *host,
                             int port) {
  size_t klen = strlen(key);
  mg_entry_t *e = calloc(1, sizeof(*e) + klen + 1);
  if (!e) return NULL;
  e->host = strdup(host);
  if (!e->host) {
    free(e);
    return NULL;
  }
  memcpy(e->key, key, klen + 1);
  snprintf(e->service, sizeof(e->service), "%d", port);
  cache_make_room(r);
  mg_entry_t **head = bucket_of(r, key);
  e->next = *head;
  *head = e;
  r->nentries++;
  return e;
}

/* ---------------------------------------------------------------------------------------
 * Waiters and queries
 * ------------------------------------------------------------------------------------- */

static void waiter_unlink(mg_waiter_t *w) {
  if (w->prev)
    w->prev->next = w->next;
  else
    w->query->waiters = w->next;
  if (w->next)
    w->next->prev = w->prev;
  else
    w->query->last = w->prev;
  w->prev = w->next = NULL;
}

static void query_drop_waiters(mg_query_t *q) {
  while (q->waiters) {
    mg_waiter_t *w = q->waiters;
    waiter_unlink(w);
    free(w);
  }
}

static void really_free(mg_resolver_t *r);

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
  mg_query_t *q = (mg_query_t *)((char *)req - offsetof(mg_query_t, req));
  mg_resolver_t *r = q->r;

  if (!r) { /* orphaned by mg_resolver_free: nobody is left to tell */
    uv_freeaddrinfo(res);
    free(q);
    return;
  }

  /* The answer goes into the cache before any callback runs, so a callback that asks for
   * the same name again is answered from it. Callbacks get a copy on the stack: the entry
   * may be evicted, or the resolver freed, by what the callbacks do. */
  mg_entry_t *e = q->entry;
  struct sockaddr_storage addr;
  if (status == 0 && !res) status = UV_EAI_NODATA;
  if (status == 0 && res->ai_addrlen > sizeof(addr)) status = UV_EAI_FAMILY;
  if (status == 0) memcpy(&addr, res->ai_addr, res->ai_addrlen);
  uv_freeaddrinfo(res);

  e->query = NULL;
  e->has_answer = 1;
  e->status = status;
  e->answered_ms = uv_now(r->loop);
  e->keep_ms = status == 0 || e->ttl_ms < MG_RESOLVER_NEGATIVE_MS ? e->ttl_ms
                                                                  : MG_RESOLVER_NEGATIVE_MS;
  if (status == 0) e->addr = addr;

  /* One waiter at a time is taken off the list before its callback runs, so a callback may
   * cancel any other waiter, start new lookups, or free the resolver. */
  r->dispatching++;
  while (q->waiters && !r->free_pending) {
    mg_waiter_t *w = q->waiters;
    mg_resolve_cb cb = w->cb;
    void *data = w->data;
    waiter_unlink(w);
    free(w);
    cb(data, status, status == 0 ? (const struct sockaddr *)&addr : NULL);
  }
  r->dispatching--;
  query_drop_waiters(q); /* only left when a callback freed the resolver */
  free(q);
  if (r->free_pending && r->dispatching == 0) really_free(r);
}

/* Starts a query for E; returns 0 or a negative libuv error. */
static int query_start(mg_resolver_t *r, mg_entry_t *e) {
  mg_query_t *q = calloc(1, sizeof(*q));
  if (!q) return UV_ENOMEM;
  q->r = r;
  q->entry = e;
  struct addrinfo hints;
  memset(&hints, 0, sizeof(hints));
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  /* No AI_ADDRCONFIG: with it glibc ignores loopback addresses when it decides which
   * families exist, so "localhost" would fail on a host whose only interface is lo. */
  hints.ai_flags = AI_NUMERICSERV;
  int rc = uv_getaddrinfo(r->loop, &q->req, on_resolved, e->host, e->service, &hints);
  if (rc < 0) {
    free(q);
    return rc;
  }
  e->query = q;
  return 0;
}

/* ---------------------------------------------------------------------------------------
 * Public surface
 * ------------------------------------------------------------------------------------- */

mg_resolver_t *mg_resolver_new(uv_loop_t *loop) {
  mg_resolver_t *r = calloc(1, sizeof(*r));
  if (!r) return NULL;
  r->loop = loop;
  return r;
}

static void really_free(mg_resolver_t *r) {
  for (size_t b = 0; b < MG_RESOLVER_BUCKETS; b++) {
    mg_entry_t *e = r->buckets[b];
    while (e) {
      mg_entry_t *next = e->next;
      if (e->query) {
        mg_query_t *q = e->query;
        query_drop_waiters(q);
        q->r = NULL;
        q->entry = NULL;
        /* Ends the query early if the thread pool has not started it; either way its
         * callback comes, and frees it. */
        uv_cancel((uv_req_t *)&q->req);
      }
      entry_free(e);
      e = next;
    }
  }
  free(r);
}

void mg_resolver_free(mg_resolver_t *r) {
  if (!r) return;
  if (r->dispatching) { /* called from a callback: on_resolved finishes the job */
    r->free_pending = 1;
    return;
  }
  really_free(r);
}

/* Fills SS with HOST:PORT when HOST is an IPv4 or IPv6 literal ("[::1]" too); returns 1 if
 * it was one. */
static int parse_literal(const char *host, int port, struct sockaddr_storage *ss) {
  memset(ss, 0, sizeof(*ss));
  struct sockaddr_in *in4 = (struct sockaddr_in *)ss;
  if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
    in4->sin_family = AF_INET;
    in4->sin_port = htons((uint16_t)port);
    return 1;
  }
  char buf[INET6_ADDRSTRLEN + 2];
  size_t len = strlen(host);
  if (len >= 2 && host[0] == '[' && host[len - 1] == ']' && len - 2 < sizeof(buf)) {
    memcpy(buf, host + 1, len - 2);
    buf[len - 2] = '\0';
    host = buf;
  }
  struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
  if (inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    return 1;
  }
  return 0;
}

int mg_resolver_resolve(mg_resolver_t *r, const char *host, int port, double ttl,
                        mg_resolve_cb cb, void *data, void **pending) {
  if (pending) *pending = NULL;
  if (!r || !host || !host[0] || !cb || port < 0 || port > 65535) return UV_EINVAL;

  struct sockaddr_storage ss;
  if (parse_literal(host, port, &ss)) {
    cb(data, 0, (struct sockaddr *)&ss);
    return 1;
  }

  char key[300];
  int klen = snprintf(key, sizeof(key), "%s:%d", host, port);
  if (klen < 0 || (size_t)klen >= sizeof(key)) return UV_EINVAL; /* names are <= 253 bytes */

  /* NaN and negative TTLs mean "do not use the cache"; huge ones are capped at a year. */
  uint64_t ttl_ms = !(ttl > 0) ? 0 : ttl > 31536000.0 ? 31536000000u
                                                      : (uint64_t)(ttl * 1000.0 + 0.5);
  mg_entry_t *e = entry_find(r, key);
  if (e && e->has_answer && !e->query) {
    uint64_t max_age = e->status == 0 || ttl_ms < MG_RESOLVER_NEGATIVE_MS
                           ? ttl_ms
                           : MG_RESOLVER_NEGATIVE_MS;
    if (uv_now(r->loop) - e->answered_ms < max_age) {
      /* A copy, for the same reason as in on_resolved. */
      int status = e->status;
      ss = e->addr;
      cb(data, status, status == 0 ? (struct sockaddr *)&ss : NULL);
      return 1;
    }
  }

  mg_waiter_t *w = calloc(1, sizeof(*w));
  if (!w) return UV_ENOMEM;
  int created = 0;
  if (!e) {
    e = entry_new(r, key, host, port);
    if (!e) {
      free(w);
      return UV_ENOMEM;
    }
    created = 1;
  }
  if (!e->query) {
    e->ttl_ms = ttl_ms;
    int rc = query_start(r, e);
    if (rc < 0) {
      if (created) {
        entry_unlink(r, e);
        entry_free(e);
      }
      free(w);
      return rc;
    }
  }

  mg_query_t *q = e->query;
  w->query = q;
  w->cb = cb;
  w->data = data;
  w->prev = q->last;
  if (q->last)
    q->last->next = w;
  else
    q->waiters = w;
  q->last = w;
  if (pending) *pending = w;
  return 0;
}

void mg_resolver_cancel(mg_resolver_t *r, void *pending) {
  mg_waiter_t *w = pending;
  if (!w) return;
  waiter_unlink(w);
  free(w);
}
