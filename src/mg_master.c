/* mg_master: the master process (see mg_master.h). */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "mg_http.h"
#include "mg_log.h"
#include "mg_master.h"
#include "mg_shdict.h"
#include "mg_status.h"
#include "mg_worker.h"

typedef struct slot {
  pid_t pid;
  uint64_t started_ms;
  int quick_deaths;               /* consecutive deaths within a second of starting */
  int *fds;                       /* one listening socket per listener */
} slot_t;

typedef struct master {
  uv_loop_t loop;
  mg_config_t *cfg;
  mg_shdict_t **dicts;            /* mg.shared, one per cfg->shared entry, made before fork */
  slot_t *slots;
  int nslots;
  int stopping;
  uv_signal_t sig_term, sig_int, sig_quit, sig_chld, sig_hup;
  uv_timer_t respawn_timer, kill_timer;
  mg_status_t *status;            /* the status page (mg_status.h) */
  char files_path[4200];          /* <pid_file>.files: a reload's files for the workers */
  int nworkers_conf;              /* gateway.workers as configured (a reload may not change it) */
  /* --watch: a file-system watch per directory of the config's files */
  int watch;
  uv_fs_event_t **watches;        /* each malloc'd, freed when closed */
  size_t nwatches;
  char **watched;                 /* the files whose changes reload */
  size_t nwatched;
  uv_timer_t watch_timer;         /* changes come in bursts: reload once they settle */
} master_t;

/* Binds HOST:PORT; REUSEPORT lets the worker slots share it. Returns the fd or -errno. */
static int bind_socket(const char *host, int port, int backlog, int reuseport) {
  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof ss);
  socklen_t len;
  int family;
  struct sockaddr_in *a4 = (struct sockaddr_in *)&ss;
  struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&ss;
  if (inet_pton(AF_INET, host, &a4->sin_addr) == 1) {
    a4->sin_family = AF_INET;
    a4->sin_port = htons((uint16_t)port);
    len = sizeof *a4;
    family = AF_INET;
  } else if (inet_pton(AF_INET6, host, &a6->sin6_addr) == 1) {
    a6->sin6_family = AF_INET6;
    a6->sin6_port = htons((uint16_t)port);
    len = sizeof *a6;
    family = AF_INET6;
  } else {
    return -EINVAL;
  }
  int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (reuseport) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  if (bind(fd, (struct sockaddr *)&ss, len) != 0 || listen(fd, backlog) != 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  return fd;
}

static int open_listeners(master_t *m) {
  mg_config_t *cfg = m->cfg;
  for (size_t i = 0; i < cfg->nlistens; i++) {
    const mg_listen_conf_t *l = &cfg->listens[i];
    const char *host = l->host ? l->host : "0.0.0.0";
    int backlog = l->backlog > 0 ? l->backlog : 511;
    /* A socket without SO_REUSEPORT cannot share the port with anyone, so this probe fails
     * when another process (another moongate too) holds it. */
    int probe = bind_socket(host, l->port, backlog, 0);
    if (probe < 0) {
      fprintf(stderr, "moongate: cannot listen on %s:%d: %s\n", host, l->port,
              probe == -EINVAL ? "not an IP address" : strerror(-probe));
      return -1;
    }
    close(probe);
    for (int s = 0; s < m->nslots; s++) {
      int fd = bind_socket(host, l->port, backlog, 1);
      if (fd < 0) {
        fprintf(stderr, "moongate: cannot listen on %s:%d: %s\n", host, l->port, strerror(-fd));
        return -1;
      }
      m->slots[s].fds[i] = fd;
    }
  }
  return 0;
}

static void close_listeners(master_t *m) {
  for (int s = 0; s < m->nslots; s++)
    for (size_t i = 0; i < m->cfg->nlistens; i++)
      if (m->slots[s].fds[i] >= 0) {
        close(m->slots[s].fds[i]);
        m->slots[s].fds[i] = -1;
      }
}

static master_t *the_master;
static void on_respawn_timer(uv_timer_t *t);

static void spawn(master_t *m, int s) {
  slot_t *slot = &m->slots[s];
  pid_t parent = getpid();
  if (m->status) mg_worker_set_start_generation(mg_status_load(&m->status->generation));
  pid_t pid = fork();
  if (pid < 0) {
    /* The slot's socket keeps taking connections: try again in a second. */
    mg_log_error("fork: %s; retrying in 1s", strerror(errno));
    slot->pid = 0;
    uv_timer_start(&m->respawn_timer, on_respawn_timer, 1000, 0);
    return;
  }
  if (pid == 0) {
    /* The worker: forget the master's signal handlers (libuv re-initialises its signal
     * pipe after fork) and its loop; die with the master. */
    uv_signal_stop(&m->sig_term);
    uv_signal_stop(&m->sig_int);
    uv_signal_stop(&m->sig_quit);
    uv_signal_stop(&m->sig_chld);
    uv_signal_stop(&m->sig_hup);
    signal(SIGHUP, SIG_IGN);                 /* until the worker handles it (no default death) */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(0);
    for (int o = 0; o < m->nslots; o++)
      if (o != s)
        for (size_t i = 0; i < m->cfg->nlistens; i++) close(m->slots[o].fds[i]);
    int rc = mg_worker_run(m->cfg, slot->fds, m->dicts, m->cfg->nshared, s);
    mg_config_free(m->cfg);
    free(slot->fds);
    for (int o = 0; o < m->nslots; o++)
      if (o != s) free(m->slots[o].fds);
    free(m->slots);
    exit(rc);                                /* exit, not _exit: LeakSanitizer checks here */
  }
  slot->pid = pid;
  slot->started_ms = uv_now(&m->loop);
  if (m->status && s < MG_STATUS_MAX_WORKERS) m->status->workers[s].pid = pid;
  mg_log_info("worker %d started (pid %d)", s, (int)pid);
}

static void maybe_finish(master_t *m) {
  if (!m->stopping) return;
  for (int s = 0; s < m->nslots; s++)
    if (m->slots[s].pid > 0) return;
  uv_stop(&m->loop);
}

static void on_respawn_timer(uv_timer_t *t) {
  master_t *m = t->data;
  if (m->stopping) return;
  for (int s = 0; s < m->nslots; s++)
    if (m->slots[s].pid == 0) spawn(m, s);
}

static void on_sigchld(uv_signal_t *h, int signum) {
  master_t *m = h->data;
  int status;
  pid_t pid;
  while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
    for (int s = 0; s < m->nslots; s++) {
      slot_t *slot = &m->slots[s];
      if (slot->pid != pid) continue;
      slot->pid = 0;
      if (m->stopping) break;
      if (WIFSIGNALED(status))
        mg_log_error("worker %d (pid %d) killed by signal %d; respawning", s, (int)pid,
                     WTERMSIG(status));
      else
        mg_log_error("worker %d (pid %d) exited with status %d; respawning", s, (int)pid,
                     WEXITSTATUS(status));
      uint64_t now = uv_now(&m->loop);
      slot->quick_deaths = now - slot->started_ms < 1000 ? slot->quick_deaths + 1 : 0;
      if (slot->quick_deaths >= 3) {
        /* Crashing at start: retry once a second instead of spinning. */
        uv_timer_start(&m->respawn_timer, on_respawn_timer, 1000, 0);
      } else {
        spawn(m, s);
      }
      break;
    }
  }
  maybe_finish(m);
}

static void on_kill_timer(uv_timer_t *t) {
  master_t *m = t->data;
  for (int s = 0; s < m->nslots; s++)
    if (m->slots[s].pid > 0) {
      mg_log_warn("worker %d (pid %d) did not stop in time: killing it", s, (int)m->slots[s].pid);
      kill(m->slots[s].pid, SIGKILL);
    }
}

static void on_stop_signal(uv_signal_t *h, int signum) {
  master_t *m = h->data;
  if (m->stopping) return;
  m->stopping = 1;
  mg_log_info("%s: stopping (drain timeout %.1fs)", signum == SIGINT ? "SIGINT" : "SIGTERM",
              m->cfg->drain_timeout);
  close_listeners(m);
  for (int s = 0; s < m->nslots; s++)
    if (m->slots[s].pid > 0) kill(m->slots[s].pid, SIGTERM);
  uint64_t grace = (uint64_t)(m->cfg->drain_timeout * 1000) + 2000;
  uv_timer_start(&m->kill_timer, on_kill_timer, grace, 0);
  maybe_finish(m);
}

/* ------------------------------------------------------------------------------------------
 * Reload.
 * ---------------------------------------------------------------------------------------- */

static int same_str(const char *a, const char *b) {
  return (a == NULL && b == NULL) || (a && b && strcmp(a, b) == 0);
}

/* What a reload cannot change (the sockets, the shared memory and the workers were made at
 * start). Returns NULL when NEXT is fine, else the reason. */
static const char *not_reloadable(const master_t *m, const mg_config_t *next) {
  const mg_config_t *cur = m->cfg;
  if (cur->nlistens != next->nlistens) return "the listeners changed (restart to apply)";
  for (size_t i = 0; i < cur->nlistens; i++) {
    const mg_listen_conf_t *a = &cur->listens[i], *b = &next->listens[i];
    if (!same_str(a->name, b->name) || !same_str(a->host, b->host) || a->port != b->port ||
        a->admin != b->admin)
      return a->admin || b->admin ? "the admin listener changed (restart to apply)"
                                  : "the listeners changed (restart to apply)";
  }
  if (cur->nshared != next->nshared) return "the shared dictionaries changed (restart to apply)";
  for (size_t i = 0; i < cur->nshared; i++)
    if (strcmp(cur->shared[i].name, next->shared[i].name) != 0 ||
        cur->shared[i].size != next->shared[i].size)
      return "the shared dictionaries changed (restart to apply)";
  if (next->workers != m->nworkers_conf) return "gateway.workers changed (restart to apply)";
  if (memcmp(&cur->limits, &next->limits, sizeof cur->limits) != 0)
    return "limits changed (restart to apply)";
  if (!same_str(cur->pid_file, next->pid_file) || !same_str(cur->access_log, next->access_log) ||
      !same_str(cur->error_log, next->error_log) || cur->log_level != next->log_level ||
      cur->drain_timeout != next->drain_timeout || cur->nredact_query != next->nredact_query)
    return "gateway settings changed (restart to apply)";
  for (size_t i = 0; i < cur->nredact_query; i++)
    if (strcmp(cur->redact_query[i], next->redact_query[i]) != 0)
      return "gateway settings changed (restart to apply)";
  if (next->lua_memory != cur->lua_memory) return "lua.memory changed (restart to apply)";
  if (next->lua_allow != cur->lua_allow) return "lua.allow changed (restart to apply)";
  if (!same_str(cur->admin_token, next->admin_token))
    return "the admin token changed (restart to apply)";
  return NULL;
}

static void watch_files(master_t *m, const mg_config_t *cfg);

static void reload_failed(master_t *m, const char *why) {
  mg_status_t *st = m->status;
  mg_log_error("reload failed; the running configuration stays: %s", why);
  if (!st) return;
  snprintf(st->last_error, sizeof st->last_error, "%s", why);
  size_t n = strlen(st->last_error);
  while (n && st->last_error[n - 1] == '\n') st->last_error[--n] = '\0';
  st->last_ok = 0;
  st->last_time = mg_http_wall_time();
  mg_status_store(&st->reload_failures, mg_status_load(&st->reload_failures) + 1);
  mg_status_store(&st->reloads, mg_status_load(&st->reloads) + 1);
}

/* Checks the config file again and, when it is good, tells the workers to switch. */
static void master_reload(master_t *m, const char *why) {
  if (m->stopping) return;
  uint64_t t0 = uv_hrtime();
  mg_config_t next;
  char *errors = NULL;
  mg_config_snapshot(MG_SNAPSHOT_RECORD);
  if (mg_config_load(m->cfg->file, &next, &errors) != 0) {
    mg_config_snapshot(MG_SNAPSHOT_OFF);
    reload_failed(m, errors ? errors : "out of memory");
    free(errors);
    return;
  }
  const char *bad = not_reloadable(m, &next);
  if (bad) {
    mg_config_snapshot(MG_SNAPSHOT_OFF);
    reload_failed(m, bad);
    mg_config_free(&next);
    return;
  }
  mg_config_snapshot(MG_SNAPSHOT_COMMIT);
  if (m->watch) watch_files(m, &next);
  mg_config_free(&next);
  mg_status_t *st = m->status;
  uint64_t gen = mg_status_load(&st->generation) + 1;
  /* The workers load the files as checked here, not as they may be by the time they read. */
  if (mg_config_snapshot_write(m->files_path, gen) != 0) {
    mg_log_warn("reload: cannot write %s (%s); the workers read the config files again",
                m->files_path, strerror(errno));
    unlink(m->files_path);
  }
  st->last_error[0] = '\0';
  st->last_ok = 1;
  st->last_time = mg_http_wall_time();
  mg_status_store(&st->generation, gen);
  mg_status_store(&st->reloads, mg_status_load(&st->reloads) + 1);
  for (int s = 0; s < m->nslots; s++)
    if (m->slots[s].pid > 0) kill(m->slots[s].pid, SIGHUP);
  mg_log_info("%s: generation %llu checked in %.1f ms; workers are switching", why,
              (unsigned long long)gen, (double)(uv_hrtime() - t0) / 1e6);
}

static void on_sighup(uv_signal_t *h, int signum) {
  master_reload(h->data, "SIGHUP");
}

/* --watch */
static void on_watch_timer(uv_timer_t *t) { master_reload(t->data, "file change"); }

/* Only the files the config loaded count: a log file in the same directory must not
 * reload the gateway every time a line is written. */
static void on_watch_event(uv_fs_event_t *h, const char *name, int events, int status) {
  master_t *m = h->data;
  if (status < 0 || m->stopping) return;
  if (name) {
    char dir[4096];
    size_t len = sizeof dir;
    if (uv_fs_event_getpath(h, dir, &len) != 0) return;
    int ours = 0;
    for (size_t i = 0; i < m->nwatched && !ours; i++) {
      const char *f = m->watched[i];
      size_t dl = strlen(dir);
      ours = strncmp(f, dir, dl) == 0 && f[dl] == '/' && strcmp(f + dl + 1, name) == 0;
    }
    if (!ours) return;
  }
  uv_timer_start(&m->watch_timer, on_watch_timer, 100, 0);
}

static void on_watch_closed(uv_handle_t *h) { free(h); }

static void unwatch(master_t *m) {
  for (size_t i = 0; i < m->nwatches; i++) uv_close((uv_handle_t *)m->watches[i], on_watch_closed);
  free(m->watches);
  m->watches = NULL;
  m->nwatches = 0;
  for (size_t i = 0; i < m->nwatched; i++) free(m->watched[i]);
  free(m->watched);
  m->watched = NULL;
  m->nwatched = 0;
}

/* Watches the directory of every file the config loaded (the config's own first). */
static void watch_files(master_t *m, const mg_config_t *cfg) {
  unwatch(m);
  uv_fs_event_t **list = calloc(cfg->nfiles ? cfg->nfiles : 1, sizeof *list);
  m->watched = calloc(cfg->nfiles ? cfg->nfiles : 1, sizeof *m->watched);
  if (!list || !m->watched) {
    free(list);
    return;
  }
  for (size_t i = 0; i < cfg->nfiles; i++)
    if ((m->watched[m->nwatched] = strdup(cfg->files[i])) != NULL) m->nwatched++;
  size_t n = 0;
  for (size_t i = 0; i < cfg->nfiles; i++) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", cfg->files[i]);
    char *slash = strrchr(dir, '/');
    if (!slash) continue;
    *slash = '\0';
    int seen = 0;
    for (size_t j = 0; j < n && !seen; j++) {
      char other[4096];
      size_t len = sizeof other;
      if (uv_fs_event_getpath(list[j], other, &len) == 0 && strcmp(other, dir) == 0) seen = 1;
    }
    if (seen) continue;
    uv_fs_event_t *h = malloc(sizeof *h);
    if (!h) break;
    uv_fs_event_init(&m->loop, h);
    h->data = m;
    if (uv_fs_event_start(h, on_watch_event, dir, 0) != 0) {
      mg_log_warn("--watch: cannot watch %s", dir);
      uv_close((uv_handle_t *)h, on_watch_closed);
      continue;
    }
    list[n++] = h;
  }
  m->watches = list;
  m->nwatches = n;
}

static int write_pid_file(const char *path) {
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return -errno;
  char buf[32];
  int n = snprintf(buf, sizeof buf, "%d\n", (int)getpid());
  ssize_t w = write(fd, buf, (size_t)n);
  close(fd);
  return w == n ? 0 : -EIO;
}

/* Each client connection costs a descriptor, and a proxied one a second for the upstream:
 * raise the soft limit to what max_connections needs (up to the hard limit). */
static void raise_fd_limit(const mg_config_t *cfg) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  rlim_t want = (rlim_t)cfg->limits.max_connections * 2 + 1024;
  if (rl.rlim_cur >= want) return;
  rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > want ? want : rl.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &rl) != 0) getrlimit(RLIMIT_NOFILE, &rl);
  if (rl.rlim_cur < (rlim_t)cfg->limits.max_connections + 64)
    mg_log_warn("open-file limit %llu is below the %llu that max_connections = %d needs",
                (unsigned long long)rl.rlim_cur, (unsigned long long)want,
                cfg->limits.max_connections);
}

int mg_master_run(mg_config_t *cfg, int nworkers, int watch) {
  master_t m;
  memset(&m, 0, sizeof m);
  the_master = &m;
  m.cfg = cfg;
  m.watch = watch;
  m.nworkers_conf = cfg->workers;
  if (nworkers <= 0) nworkers = cfg->workers;
  if (nworkers <= 0) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    nworkers = n > 0 ? (int)n : 1;
  }
  m.nslots = nworkers;
  m.slots = calloc((size_t)nworkers, sizeof(slot_t));
  for (int s = 0; s < nworkers; s++) {
    m.slots[s].fds = malloc((cfg->nlistens ? cfg->nlistens : 1) * sizeof(int));
    for (size_t i = 0; i < cfg->nlistens; i++) m.slots[s].fds[i] = -1;
  }
  int rc = 1;
  raise_fd_limit(cfg);
  m.dicts = calloc(cfg->nshared ? cfg->nshared : 1, sizeof *m.dicts);
  for (size_t i = 0; m.dicts && i < cfg->nshared; i++) {
    m.dicts[i] = mg_shdict_create(cfg->shared[i].name, cfg->shared[i].size);
    if (!m.dicts[i]) {
      fprintf(stderr, "moongate: cannot create shared dictionary %s (%zu bytes)\n",
              cfg->shared[i].name, cfg->shared[i].size);
      goto out;
    }
  }
  if (open_listeners(&m) != 0) goto out;
  if (cfg->pid_file && (rc = write_pid_file(cfg->pid_file)) != 0) {
    fprintf(stderr, "moongate: cannot write pid file %s: %s\n", cfg->pid_file, strerror(-rc));
    rc = 1;
    goto out;
  }
  char status_path[4200];
  mg_status_path(cfg->pid_file, status_path, sizeof status_path);
  m.status = mg_status_create(status_path);
  if (!m.status) {
    fprintf(stderr, "moongate: cannot create status file %s: %s\n", status_path, strerror(errno));
    rc = 1;
    goto out;
  }
  mg_status_files_path(cfg->pid_file, m.files_path, sizeof m.files_path);
  unlink(m.files_path);                      /* a stale one (an earlier run's) is not ours */
  m.status->master_pid = getpid();
  char config_abs[PATH_MAX];
  snprintf(m.status->config_file, sizeof m.status->config_file, "%s",
           realpath(cfg->file, config_abs) ? config_abs : cfg->file);
  m.status->started = mg_http_wall_time();
  m.status->nworkers = nworkers;
  m.status->generation = 1;
  m.status->last_ok = 1;
  mg_worker_set_status(m.status);
  signal(SIGPIPE, SIG_IGN);
  uv_loop_init(&m.loop);
  m.loop.data = &m;
  uv_signal_t *sigs[] = {&m.sig_term, &m.sig_int, &m.sig_quit, &m.sig_chld, &m.sig_hup};
  for (size_t i = 0; i < 5; i++) {
    uv_signal_init(&m.loop, sigs[i]);
    sigs[i]->data = &m;
  }
  uv_signal_start(&m.sig_term, on_stop_signal, SIGTERM);
  uv_signal_start(&m.sig_int, on_stop_signal, SIGINT);
  uv_signal_start(&m.sig_quit, on_stop_signal, SIGQUIT);
  uv_signal_start(&m.sig_chld, on_sigchld, SIGCHLD);
  uv_signal_start(&m.sig_hup, on_sighup, SIGHUP);
  uv_timer_init(&m.loop, &m.respawn_timer);
  uv_timer_init(&m.loop, &m.kill_timer);
  uv_timer_init(&m.loop, &m.watch_timer);
  m.respawn_timer.data = m.kill_timer.data = m.watch_timer.data = &m;
  if (watch) watch_files(&m, cfg);

  for (size_t i = 0; i < cfg->nlistens; i++)
    mg_log_info("listening on %s:%d%s%s", cfg->listens[i].host ? cfg->listens[i].host : "0.0.0.0",
                cfg->listens[i].port, cfg->listens[i].name ? " as " : "",
                cfg->listens[i].name ? cfg->listens[i].name : "");
  mg_log_info("moongate started: master pid %d, %d worker(s), config %s", (int)getpid(),
              nworkers, cfg->file);
  for (int s = 0; s < nworkers; s++) spawn(&m, s);

  uv_run(&m.loop, UV_RUN_DEFAULT);

  for (size_t i = 0; i < 5; i++) uv_close((uv_handle_t *)sigs[i], NULL);
  uv_close((uv_handle_t *)&m.respawn_timer, NULL);
  uv_close((uv_handle_t *)&m.kill_timer, NULL);
  uv_close((uv_handle_t *)&m.watch_timer, NULL);
  unwatch(&m);
  uv_run(&m.loop, UV_RUN_DEFAULT);
  uv_loop_close(&m.loop);
  if (cfg->pid_file) unlink(cfg->pid_file);
  unlink(status_path);
  unlink(m.files_path);
  mg_config_snapshot(MG_SNAPSHOT_FREE);
  mg_log_info("moongate stopped");
  rc = 0;
out:
  if (m.status) munmap(m.status, sizeof *m.status);
  close_listeners(&m);
  for (int s = 0; s < nworkers; s++) free(m.slots[s].fds);
  free(m.slots);
  for (size_t i = 0; m.dicts && i < cfg->nshared; i++) mg_shdict_destroy(m.dicts[i]);
  free(m.dicts);
  return rc;
}
