/* mg_master: the master process (see mg_master.h). */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include "mg_log.h"
#include "mg_master.h"
#include "mg_shdict.h"
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
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(0);
    for (int o = 0; o < m->nslots; o++)
      if (o != s)
        for (size_t i = 0; i < m->cfg->nlistens; i++) close(m->slots[o].fds[i]);
    int rc = mg_worker_run(m->cfg, slot->fds, m->dicts, m->cfg->nshared);
    mg_config_free(m->cfg);
    free(slot->fds);
    for (int o = 0; o < m->nslots; o++)
      if (o != s) free(m->slots[o].fds);
    free(m->slots);
    exit(rc);                                /* exit, not _exit: LeakSanitizer checks here */
  }
  slot->pid = pid;
  slot->started_ms = uv_now(&m->loop);
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

static void on_sighup(uv_signal_t *h, int signum) {
  mg_log_warn("SIGHUP: live reload arrives with the Lua hooks; restart to load a new config");
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

int mg_master_run(mg_config_t *cfg, int nworkers) {
  master_t m;
  memset(&m, 0, sizeof m);
  the_master = &m;
  m.cfg = cfg;
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
  m.respawn_timer.data = m.kill_timer.data = &m;

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
  uv_run(&m.loop, UV_RUN_DEFAULT);
  uv_loop_close(&m.loop);
  if (cfg->pid_file) unlink(cfg->pid_file);
  mg_log_info("moongate stopped");
  rc = 0;
out:
  close_listeners(&m);
  for (int s = 0; s < nworkers; s++) free(m.slots[s].fds);
  free(m.slots);
  for (size_t i = 0; m.dicts && i < cfg->nshared; i++) mg_shdict_destroy(m.dicts[i]);
  free(m.dicts);
  return rc;
}
