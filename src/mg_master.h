/* mg_master: the master process. Owns the listening sockets (one SO_REUSEPORT socket per
 * worker slot and listener, so the kernel spreads connections and a respawned worker takes
 * over its slot's queue), the pid file and the signals; forks the workers and respawns one
 * that dies; on SIGTERM/SIGINT stops them gracefully and exits 0. */
#ifndef MG_MASTER_H
#define MG_MASTER_H

#include "mg_config.h"

/* Runs the gateway with CFG and NWORKERS workers (0 = config or one per core); with WATCH,
 * reloads when a file in the directories of the config's files changes. Returns the
 * process exit code: 0 after a graceful stop, 1 when it could not start (the reason was
 * printed as one line on stderr).
 *
 * Reload (SIGHUP, `moongate reload`, the admin API's POST /reload, --watch): the master
 * loads and checks the config again, off the workers' request path; if it fails, or changes
 * what a reload cannot (listeners, the admin listener, shared dictionaries, the number of
 * workers, the Lua memory cap), nothing changes and the error goes to the status page and
 * the log. Otherwise it announces a new generation number on the status page and signals
 * the workers, which each build the new generation in their own VM and switch to it;
 * requests in flight finish on the generation they started on. */
int mg_master_run(mg_config_t *cfg, int nworkers, int watch);

#endif
