/* mg_master: the master process. Owns the listening sockets (one SO_REUSEPORT socket per
 * worker slot and listener, so the kernel spreads connections and a respawned worker takes
 * over its slot's queue), the pid file and the signals; forks the workers and respawns one
 * that dies; on SIGTERM/SIGINT stops them gracefully and exits 0. */
#ifndef MG_MASTER_H
#define MG_MASTER_H

#include "mg_config.h"

/* Runs the gateway with CFG and NWORKERS workers (0 = config or one per core). Returns the
 * process exit code: 0 after a graceful stop, 1 when it could not start (the reason was
 * printed as one line on stderr). */
int mg_master_run(mg_config_t *cfg, int nworkers);

#endif
