/* mg_gen: config generations in a worker (see mg_gen.h). */
#include "mg_gen.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mg_log.h"
#include "mg_router.h"
#include "mg_upstream.h"
#include "mg_worker.h"

mg_gen_t *mg_gen_new(mg_worker_t *w, mg_config_t *cfg, uint64_t id, char *err, size_t errlen) {
  mg_gen_t *g = calloc(1, sizeof *g);
  if (!g) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  g->refs = 1;
  g->id = id;
  g->w = w;
  g->cfg = *cfg;
  memset(cfg, 0, sizeof *cfg);
  g->lua_ref = -1;
  g->nrouters = w->nlisteners;
  g->routers = calloc(g->nrouters ? g->nrouters : 1, sizeof *g->routers);
  g->nupstreams = g->cfg.nupstreams;
  g->upstreams = mg_upstreams_new(w, &g->cfg);
  if (!g->routers || !g->upstreams) {
    snprintf(err, errlen, "out of memory");
    goto fail;
  }
  for (size_t i = 0; i < g->nupstreams; i++) g->upstreams[i].gen = g;
  for (size_t i = 0; i < g->nrouters; i++) {
    const char *name = w->listeners[i].conf->name;
    g->routers[i] = mg_router_new(g->cfg.routes, g->cfg.nroutes, name, err, errlen);
    if (!g->routers[i]) goto fail;
  }
  return g;
fail:
  g->refs = 0;
  mg_gen_free(g);
  return NULL;
}

void mg_gen_free(mg_gen_t *g) {
  if (g->lua_unref) g->lua_unref(g);
  for (size_t i = 0; i < g->nrouters; i++) mg_router_free(g->routers[i]);
  free(g->routers);
  mg_upstreams_free(g->upstreams, g->nupstreams);
  mg_config_free(&g->cfg);
  free(g);
}

mg_gen_t *mg_gen_hold(mg_gen_t *g) {
  g->refs++;
  return g;
}

void mg_gen_release(mg_gen_t *g) {
  if (!g || --g->refs > 0) return;
  if (g->w && g->w->gen != g)
    mg_log_debug("generation %llu freed (its last request ended)", (unsigned long long)g->id);
  mg_gen_free(g);
}

uint64_t mg_gen_id(const mg_gen_t *g) { return g->id; }

const mg_config_t *mg_gen_config(const mg_gen_t *g) { return &g->cfg; }

mg_upstream_t *mg_gen_upstream(mg_gen_t *g, const char *name) {
  for (size_t i = 0; i < g->nupstreams; i++)
    if (strcmp(g->upstreams[i].conf->name, name) == 0) return &g->upstreams[i];
  return NULL;
}
