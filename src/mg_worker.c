/* mg_worker: one worker process. Makes its Lua VM (the mg API registered), evaluates the
 * config in it into its first generation (mg_gen: routers, upstreams, hooks; from the files
 * the master accepted, inherited at fork), opens the access log, serves the listening sockets
 * it inherited; on SIGHUP builds the generation the master announced on the status page and
 * switches to it (worker_reload); on SIGTERM/SIGINT drains: stops accepting, closes idle
 * connections, lets in-flight requests finish (they answer with Connection: close) up to
 * gateway.drain_timeout, then exits. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "mg_hooks.h"
#include "mg_log.h"
#include "mg_fetch.h"
#include "mg_lua_aggregate.h"
#include "mg_lua_fetch.h"
#include "mg_lua_shared.h"
#include "mg_lua_time.h"
#include "mg_shdict.h"
#include "mg_status.h"

#include <lua.h>
#include "mg_proxy.h"
#include "mg_request.h"
#include "mg_upstream.h"
#include "mg_worker.h"


void mg_worker_alloc_cb(uv_handle_t *handle, size_t suggested, uv_buf_t *buf) {
  mg_worker_t *w = handle->loop->data;
  buf->base = w->readbuf;
  buf->len = sizeof w->readbuf;
}

static void worker_finish(mg_worker_t *w) { uv_stop(&w->loop); }

void mg_worker_conn_closed(mg_worker_t *w) {
  w->nconns--;
  if (w->stopping && w->nconns == 0) worker_finish(w);
}

static void on_drain_timeout(uv_timer_t *t) {
  mg_worker_t *w = t->data;
  mg_log_warn("drain timeout: closing %zu connection(s) still busy", w->nconns);
  worker_finish(w);
}

static void worker_stop(mg_worker_t *w) {
  if (w->stopping) return;
  w->stopping = 1;
  for (size_t i = 0; i < w->nlisteners; i++)
    if (!uv_is_closing((uv_handle_t *)&w->listeners[i].handle))
      uv_close((uv_handle_t *)&w->listeners[i].handle, NULL);
  mg_server_drain(w);
  if (w->nconns == 0) {
    worker_finish(w);
    return;
  }
  uint64_t drain = mg_ms(w->cfg->drain_timeout);
  uv_timer_start(&w->drain_timer, on_drain_timeout, drain ? drain : 1, 0);
}

static mg_status_t *the_status;
static uint64_t start_generation = 1;

void mg_worker_set_status(mg_status_t *st) { the_status = st; }

void mg_worker_set_start_generation(uint64_t id) { start_generation = id; }

mg_status_t *mg_worker_status(void) { return the_status; }

static mg_status_worker_t *my_status(mg_worker_t *w) {
  if (!the_status || w->slot < 0 || w->slot >= MG_STATUS_MAX_WORKERS) return NULL;
  return &the_status->workers[w->slot];
}

/* The master announced a new generation: build it in this VM and switch. Requests in flight
 * keep the generation they hold; the old one is freed when the last of them ends. */
static void worker_reload(mg_worker_t *w) {
  if (!the_status || w->stopping) return;
  uint64_t id = mg_status_load(&the_status->generation);
  if (id <= w->gen->id) return;
  uint64_t t0 = uv_hrtime();
  /* The files as the master checked them (it writes them before it announces a generation);
   * without that file (it could not write it), the files as they are now. */
  char files[4200];
  mg_status_files_path(w->cfg->pid_file, files, sizeof files);
  uint64_t checked = mg_config_snapshot_read(files);
  if (checked >= id) {
    id = checked;
    mg_config_snapshot(MG_SNAPSHOT_REPLAY);
  } else {
    mg_config_snapshot(MG_SNAPSHOT_FREE);
  }
  char *errors = NULL;
  mg_gen_t *g = mg_worker_load_gen(w, id, &errors);
  mg_config_snapshot(MG_SNAPSHOT_FREE);
  mg_status_worker_t *me = my_status(w);
  /* What the load left behind (all of it, when it failed) must not count against the cap of
   * the generation that keeps serving. */
  lua_gc(mg_lua_vm_state(w->vm), LUA_GCCOLLECT, 0);
  if (!g) {
    mg_log_error("reload: generation %llu could not be loaded; generation %llu keeps serving: %s",
                 (unsigned long long)id, (unsigned long long)w->gen->id,
                 errors ? errors : "out of memory");
    if (me) {
      snprintf(me->error, sizeof me->error, "%s", errors ? errors : "out of memory");
      size_t n = strlen(me->error);
      while (n && me->error[n - 1] == '\n') me->error[--n] = '\0';
      mg_status_store(&me->failed_generation, id);
    }
    free(errors);
    return;
  }
  mg_gen_adopt(g, w->gen);
  mg_gen_t *old = w->gen;
  w->gen = g;
  mg_gen_release(old);
  if (me) {
    me->error[0] = '\0';
    mg_status_store(&me->generation, id);
  }
  mg_log_info("reload: now serving generation %llu (built in %.1f ms)", (unsigned long long)id,
              (double)(uv_hrtime() - t0) / 1e6);
}

static void on_signal(uv_signal_t *s, int signum) {
  mg_worker_t *w = s->data;
  if (signum == SIGHUP) {
    worker_reload(w);
    return;
  }
  worker_stop(w);
}

/* Evaluates the config file in this worker's VM and builds a generation from it. Returns
 * NULL with the errors (malloc'd text, file:line per line) in *ERRORS. */
mg_gen_t *mg_worker_load_gen(mg_worker_t *w, uint64_t id, char **errors) {
  mg_config_t cfg;
  int ref = -1;
  *errors = NULL;
  if (mg_config_load_vm(w->vm, w->cfg->file, &cfg, errors, &ref) != 0) return NULL;
  char err[256] = "";
  mg_gen_t *g = mg_gen_new(w, &cfg, id, err, sizeof err);
  mg_config_free(&cfg);
  if (!g) {
    mg_lua_vm_unref(w->vm, ref);
    *errors = strdup(err);
    return NULL;
  }
  g->lua_ref = ref;
  g->lua_unref = mg_hooks_gen_unref;
  return g;
}

/* The worker's VM and its first generation: the config the master validated, evaluated again
 * here so that its hooks live in this worker's VM. */
static int worker_first_gen(mg_worker_t *w) {
  char err[256] = "";
  w->vm = mg_lua_vm_new(w->cfg->lua_memory, err, sizeof err);
  if (!w->vm || mg_hooks_vm_init(w->vm, err, sizeof err) != 0 ||
      (w->cfg->lua_allow && mg_lua_vm_allow(w->vm, w->cfg->lua_allow) != 0)) {
    mg_log_error("worker: cannot set up Lua: %s", err);
    return -1;
  }
  if (mg_lua_time_register(w->vm) != 0 ||
      mg_lua_shared_register(w->vm, (mg_shdict_t *const *)w->dicts, w->ndicts) != 0 ||
      mg_lua_aggregate_register(w->vm) != 0 || mg_lua_fetch_register(w->vm) != 0) {
    mg_log_error("worker: cannot set up the mg API");
    return -1;
  }
  char *errors = NULL;
  uint64_t id = start_generation;            /* the generation of the files inherited at fork */
  mg_config_snapshot(MG_SNAPSHOT_REPLAY);    /* the files as the master accepted them */
  w->gen = mg_worker_load_gen(w, id ? id : 1, &errors);
  mg_config_snapshot(MG_SNAPSHOT_FREE);
  if (!w->gen) {
    mg_log_error("worker: cannot load %s: %s", w->cfg->file, errors ? errors : "out of memory");
    free(errors);
    return -1;
  }
  return 0;
}

static void close_any(uv_handle_t *h, void *arg) {
  if (!uv_is_closing(h)) uv_close(h, NULL);
}

int mg_worker_run(const mg_config_t *cfg, const int *fds, struct mg_shdict *const *dicts,
                  size_t ndicts, int slot) {
  mg_worker_t *w = calloc(1, sizeof *w);
  if (!w) return 1;
  w->slot = slot;
  w->dicts = dicts;
  w->ndicts = ndicts;
  signal(SIGPIPE, SIG_IGN);
  uv_loop_init(&w->loop);
  w->loop.data = w;
  w->cfg = cfg;
  unsigned char rnd[8] = {0};
  if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) {
    uint64_t x = uv_hrtime() ^ ((uint64_t)getpid() << 32);
    memcpy(rnd, &x, sizeof rnd);
  }
  for (size_t i = 0; i < sizeof rnd; i++) snprintf(w->id_prefix + 2 * i, 3, "%02x", rnd[i]);
  mg_server_init_parser_settings();
  mg_server_timers_init(w);
  mg_proxy_init();
  w->resolver = mg_resolver_new(&w->loop);
  if (!w->resolver) {
    mg_log_error("worker: out of memory");
    return 1;
  }
  int rc = mg_access_log_open(&w->loop, cfg->access_log, cfg->redact_query, cfg->nredact_query);
  if (rc < 0) mg_log_error("cannot open access log %s: %s", cfg->access_log, uv_strerror(rc));
  uv_timer_init(&w->loop, &w->drain_timer);
  w->drain_timer.data = w;
  uv_unref((uv_handle_t *)&w->drain_timer);

  w->nlisteners = cfg->nlistens;
  w->listeners = calloc(cfg->nlistens ? cfg->nlistens : 1, sizeof(mg_listener_t));
  for (size_t i = 0; i < cfg->nlistens; i++) {
    mg_listener_t *l = &w->listeners[i];
    l->conf = &cfg->listens[i];
    l->index = i;
    l->w = w;
    l->fd = fds[i];
    uv_tcp_init(&w->loop, &l->handle);
    l->handle.data = l;
    if ((rc = uv_tcp_open(&l->handle, l->fd)) != 0 ||
        (rc = uv_listen((uv_stream_t *)&l->handle, l->conf->backlog > 0 ? l->conf->backlog : 511,
                        mg_server_on_connection)) != 0) {
      mg_log_error("listen on port %d: %s", l->conf->port, uv_strerror(rc));
      return 1;
    }
  }
  if (worker_first_gen(w) != 0) return 1;
  mg_status_worker_t *me = my_status(w);
  if (me) {
    me->pid = getpid();
    mg_status_store(&me->generation, w->gen->id);
  }
  uv_signal_init(&w->loop, &w->sig_term);
  uv_signal_init(&w->loop, &w->sig_int);
  uv_signal_init(&w->loop, &w->sig_hup);
  w->sig_term.data = w->sig_int.data = w->sig_hup.data = w;
  uv_signal_start(&w->sig_term, on_signal, SIGTERM);
  uv_signal_start(&w->sig_int, on_signal, SIGINT);
  uv_signal_start(&w->sig_hup, on_signal, SIGHUP);
  worker_reload(w);                          /* a reload announced while this worker started */

  uv_run(&w->loop, UV_RUN_DEFAULT);

  /* Drained (or out of time): cut what is still open and free it. */
  while (w->conns) mg_conn_abort(w->conns);
  mg_lua_timers_cancel_all();
  mg_fetch_cache_free(w);
  mg_lua_fetch_free_specs();
  mg_access_log_close();
  mg_gen_t *gen = w->gen;
  w->gen = NULL;
  mg_gen_release(gen);
  mg_resolver_free(w->resolver);
  uv_walk(&w->loop, close_any, NULL);
  uv_run(&w->loop, UV_RUN_DEFAULT);
  uv_loop_close(&w->loop);
  mg_request_free_spares(w);
  mg_proxy_free_spares();
  mg_hooks_free_spares();
  mg_lua_vm_free(w->vm);
  free(w->listeners);
  free(w);
  return 0;
}
