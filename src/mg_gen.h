/* mg_gen: a config generation in a worker. The config file and every script it loads form
 * one generation: the validated C config, a router per listener, the upstreams, and the Lua
 * values (hooks, handlers) that the config evaluated to in the worker's VM. The worker's
 * current generation serves new requests; each request (and each task: a log hook, a timer)
 * holds a reference to the generation it started on, and a generation replaced by a reload is
 * freed when its last reference goes. */
#ifndef MG_GEN_H
#define MG_GEN_H

#include <stdint.h>

#include "mg_config.h"

struct mg_worker;
struct mg_upstream;
struct mg_router;

typedef struct mg_gen mg_gen_t;

struct mg_gen {
  int refs;
  uint64_t id;                    /* 1 for the config the gateway started with, +1 per reload */
  struct mg_worker *w;
  mg_config_t cfg;                /* owned */
  struct mg_router **routers;     /* one per worker listener, by index */
  size_t nrouters;
  struct mg_upstream *upstreams;  /* one per cfg.upstreams entry */
  size_t nupstreams;
  int lua_ref;                    /* the config's Lua values in the worker's VM, or -1 */
  void (*lua_unref)(mg_gen_t *g); /* releases lua_ref (set by whoever filled it) */
  void *hooks;                    /* the hook lists of this generation, found once
                                     (mg_hooks.c; freed with lua_ref by lua_unref) */
};

/* Builds a generation of worker W from CFG (whose contents it takes over: *CFG is zeroed),
 * with one reference held by the caller. Returns NULL with a message in ERR on failure. */
mg_gen_t *mg_gen_new(struct mg_worker *w, mg_config_t *cfg, uint64_t id, char *err,
                     size_t errlen);

struct mg_target;

/* The target of G that stands for T of another generation (same upstream name, same host
 * and port), or NULL. */
struct mg_target *mg_gen_same_target(mg_gen_t *g, const struct mg_target *t);

/* Moves OLD's idle keep-alive connections into the matching targets of G (a reload keeps
 * the upstream pools). */
void mg_gen_adopt(mg_gen_t *g, mg_gen_t *old);

/* Frees G at once (mg_gen_release does this when the last reference goes). */
void mg_gen_free(mg_gen_t *g);

/* Takes a reference to G (returns G). */
mg_gen_t *mg_gen_hold(mg_gen_t *g);

/* Drops a reference; the last one frees the generation. */
void mg_gen_release(mg_gen_t *g);

/* The upstream named NAME in generation G, or NULL. */
struct mg_upstream *mg_gen_upstream(mg_gen_t *g, const char *name);

#endif
