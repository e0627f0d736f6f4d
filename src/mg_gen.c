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

mg_upstream_t *mg_gen_upstream(mg_gen_t *g, const char *name) {
  for (size_t i = 0; i < g->nupstreams; i++)
    if (strcmp(g->upstreams[i].conf->name, name) == 0) return &g->upstreams[i];
  return NULL;
}

mg_target_t *mg_gen_same_target(mg_gen_t *g, const mg_target_t *t) {
  mg_upstream_t *u = mg_gen_upstream(g, t->up->conf->name);
  if (!u) return NULL;
  for (size_t i = 0; i < u->ntargets; i++)
    if (u->targets[i].conf->port == t->conf->port && strcmp(u->targets[i].conf->host, t->conf->host) == 0)
      return &u->targets[i];
  return NULL;
}

void mg_gen_adopt(mg_gen_t *g, mg_gen_t *old) {
  for (size_t i = 0; i < old->nupstreams; i++) {
    mg_upstream_t *u = &old->upstreams[i];
    for (size_t j = 0; j < u->ntargets; j++) {
      mg_target_t *from = &u->targets[j];
      mg_target_t *to = from->idle ? mg_gen_same_target(g, from) : NULL;
      if (!to) continue;
      int max_idle = to->up->conf->keepalive_max_idle;
      while (from->idle) {                   /* unlink from the old pool, link into the new */
        mg_upconn_t *c = from->idle;
        if (max_idle <= 0 || to->nidle >= (size_t)max_idle) {   /* the new pool is smaller */
          mg_upconn_close(c);                /* unlinks it from FROM */
          continue;
        }
        from->idle = c->next;
        if (from->idle) from->idle->prev = NULL;
        from->nidle--;
        c->target = to;
        c->prev = NULL;
        c->next = to->idle;
        if (to->idle) to->idle->prev = c;
        to->idle = c;
        to->nidle++;
      }
    }
  }
}
