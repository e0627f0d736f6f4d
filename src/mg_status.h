/* mg_status: the gateway's status page, a small file mapped into the master and every worker
 * (MAP_SHARED, next to the pid file: "<pid_file>.status"). The master writes the reload
 * results and the generation it accepted; each worker writes which generation it serves (or
 * why it could not load the last one). The admin API (GET /status, POST /reload) and
 * `moongate reload` read it. Writers never share a field; numbers are written and read with
 * atomics, texts are written before the number that announces them. */
#ifndef MG_STATUS_H
#define MG_STATUS_H

#include <stddef.h>
#include <stdint.h>

#define MG_STATUS_MAX_WORKERS 256
#define MG_STATUS_MAGIC 0x6d677374u

typedef struct mg_status_worker {
  int32_t pid;
  uint64_t generation;          /* the generation it serves */
  uint64_t failed_generation;   /* the last generation it could not load (0: none) */
  char error[1024];             /* why */
} mg_status_worker_t;

typedef struct mg_status {
  uint32_t magic;
  int32_t master_pid;
  double started;               /* wall-clock seconds */
  int32_t nworkers;
  uint64_t generation;          /* the latest generation the master accepted */
  uint64_t reloads;             /* reload attempts the master finished (ok or not) */
  uint64_t reload_failures;
  int32_t last_ok;              /* the last attempt's result */
  double last_time;
  char last_error[8192];        /* "file:line: message" lines of the last failed attempt */
  mg_status_worker_t workers[MG_STATUS_MAX_WORKERS];
  char config_file[4096];       /* the absolute path of the config the master runs */
} mg_status_t;

/* The master's: creates (truncates) PATH and maps it. NULL with errno on failure. */
mg_status_t *mg_status_create(const char *path);

/* Maps an existing status file read-only (for `moongate reload`). NULL with errno. */
const mg_status_t *mg_status_open(const char *path);

/* Unmaps it. */
void mg_status_close(const mg_status_t *s);

/* The pid file when the config names none (config.lua's default for gateway.pid_file). */
#define MG_DEFAULT_PID_FILE "/tmp/moongate.pid"

/* The status file of a pid file: "<pid_file>.status" (into BUF). */
void mg_status_path(const char *pid_file, char *buf, size_t len);

/* The file through which the master hands a reload's config files to the workers (see
 * mg_config_snapshot_write): "<pid_file>.files" (into BUF). */
void mg_status_files_path(const char *pid_file, char *buf, size_t len);

/* Atomic accessors for the counters. */
static inline uint64_t mg_status_load(const uint64_t *p) {
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void mg_status_store(uint64_t *p, uint64_t v) {
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

#endif
