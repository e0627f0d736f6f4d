/* main: the moongate command line.
 *   moongate [-c FILE] [-w N] [--watch]         run (master + workers) in the foreground
 *   moongate check -c FILE                      validate; print every error as file:line
 *   moongate reload -c FILE                     check, then switch the running gateway to it
 *   moongate stop -c FILE                       SIGTERM the running master (pid file)
 *   moongate version */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mg_config.h"
#include "mg_log.h"
#include "mg_master.h"
#include "mg_status.h"
#include "mg_version.h"

#define DEFAULT_CONFIG "examples/gateway.lua"

static void usage(FILE *f) {
  fprintf(f,
          "usage: moongate [-c FILE] [-w N] [--watch]         run the gateway\n"
          "       moongate check [-c FILE]                    validate a config\n"
          "       moongate reload [-c FILE]                   reload the running gateway\n"
          "       moongate stop [-c FILE]                     stop the running gateway\n"
          "       moongate version\n"
          "FILE defaults to %s; -w N sets the number of workers (default: config, or one\n"
          "per core); --watch reloads when a file next to the config's files changes.\n",
          DEFAULT_CONFIG);
}

static int load(const char *file, mg_config_t *cfg) {
  char *errors = NULL;
  if (mg_config_load(file, cfg, &errors) == 0) return 0;
  fputs(errors ? errors : "moongate: cannot load the config\n", stderr);
  if (errors && errors[0] && errors[strlen(errors) - 1] != '\n') fputc('\n', stderr);
  free(errors);
  return -1;
}

/* The running master's pid from the pid file, or -1 (the reason printed). */
static int read_pid(const char *path) {
  FILE *f = fopen(path, "r");
  if (!f) {
    fprintf(stderr, "moongate: cannot read pid file %s: %s (is it running?)\n", path,
            strerror(errno));
    return -1;
  }
  int pid = 0;
  int ok = fscanf(f, "%d", &pid) == 1 && pid > 0;
  fclose(f);
  if (!ok) {
    fprintf(stderr, "moongate: pid file %s holds no pid\n", path);
    return -1;
  }
  return pid;
}

/* The config was checked already (main loads it first): signal the master, then wait for
 * its verdict and for every worker to serve the new generation (or report why not). */
static int cmd_reload(mg_config_t *cfg) {
  const char *path = cfg->pid_file ? cfg->pid_file : MG_DEFAULT_PID_FILE;
  int pid = read_pid(path);
  if (pid < 0) return 1;
  char spath[4200];
  mg_status_path(path, spath, sizeof spath);
  const mg_status_t *st = mg_status_open(spath);
  if (!st) {
    fprintf(stderr, "moongate: cannot read status file %s: %s\n", spath, strerror(errno));
    return 1;
  }
  uint64_t before = mg_status_load((uint64_t *)&st->reloads);
  int rc = 1;
  if (kill(pid, SIGHUP) != 0) {
    fprintf(stderr, "moongate: cannot signal pid %d: %s\n", pid, strerror(errno));
    goto out;
  }
  int waited = 0;
  while (mg_status_load((uint64_t *)&st->reloads) == before && waited < 30000) {
    usleep(1000);
    waited++;
  }
  if (mg_status_load((uint64_t *)&st->reloads) == before) {
    fprintf(stderr, "moongate: the master (pid %d) did not answer the reload\n", pid);
    goto out;
  }
  if (!st->last_ok) {
    fprintf(stderr, "moongate: reload failed; the running configuration stays:\n%s\n",
            st->last_error);
    goto out;
  }
  uint64_t gen = mg_status_load((uint64_t *)&st->generation);
  for (; waited < 30000; waited++) {
    int pending = 0, failed = 0;
    for (int i = 0; i < st->nworkers && i < MG_STATUS_MAX_WORKERS; i++) {
      const mg_status_worker_t *w = &st->workers[i];
      if (mg_status_load((uint64_t *)&w->failed_generation) == gen) failed = 1;
      else if (mg_status_load((uint64_t *)&w->generation) < gen) pending = 1;
    }
    if (failed) {
      for (int i = 0; i < st->nworkers && i < MG_STATUS_MAX_WORKERS; i++)
        if (mg_status_load((uint64_t *)&st->workers[i].failed_generation) == gen)
          fprintf(stderr, "moongate: worker %d could not load generation %llu: %s\n", i,
                  (unsigned long long)gen, st->workers[i].error);
      goto out;
    }
    if (!pending) {
      printf("moongate: reloaded %s: generation %llu\n", cfg->file, (unsigned long long)gen);
      rc = 0;
      goto out;
    }
    usleep(1000);
  }
  fprintf(stderr, "moongate: the workers did not switch to generation %llu in time\n",
          (unsigned long long)gen);
out:
  mg_status_close(st);
  return rc;
}

/* SIGTERMs the master of pid file PATH and waits (bounded) for it to go away. */
static int stop_master(const char *path) {
  int pid = read_pid(path);
  if (pid < 0) return 1;
  if (kill(pid, SIGTERM) != 0) {
    fprintf(stderr, "moongate: cannot signal pid %d: %s\n", pid, strerror(errno));
    return 1;
  }
  /* Wait (bounded) for the master to finish draining, so scripts can rely on it. The master
   * removes its pid file last; a master that exited but was not yet reaped by its parent
   * still answers kill(pid, 0), so the file is what tells. */
  for (int i = 0; i < 600 && kill(pid, 0) == 0 && access(path, F_OK) == 0; i++)
    usleep(50 * 1000);
  return 0;
}

/* `moongate stop` with a config that does not load: the pid file it names is unknown. A
 * broken file must not keep its running gateway from stopping, nor stop another one: the
 * gateway of the default pid file is stopped only when its status file says it runs FILE. */
static int cmd_stop_broken(const char *file) {
  char want[PATH_MAX], spath[4200], running[4096] = "";
  const char *def = MG_DEFAULT_PID_FILE;
  if (!realpath(file, want)) snprintf(want, sizeof want, "%s", file);
  mg_status_path(def, spath, sizeof spath);
  const mg_status_t *st = mg_status_open(spath);
  if (st) {
    snprintf(running, sizeof running, "%.*s", (int)sizeof st->config_file - 1, st->config_file);
    mg_status_close(st);
  }
  if (strcmp(running, want) != 0) {
    fprintf(stderr,
            "moongate: %s has errors (above), so the pid file it names is unknown; the gateway "
            "of the default pid file %s %s%s; nothing was stopped. Fix the file, or send "
            "SIGTERM to the master (its pid is in the pid file)\n",
            file, def, st ? "runs " : "is not running", st ? running : "");
    return 1;
  }
  fprintf(stderr, "moongate: %s has errors; stopping the gateway that runs it (pid file %s)\n",
          file, def);
  return stop_master(def);
}

int main(int argc, char **argv) {
  const char *file = DEFAULT_CONFIG;
  const char *cmd = "run";
  int workers = 0;
  int watch = 0;
  int i = 1;
  if (i < argc && argv[i][0] != '-') cmd = argv[i++];
  for (; i < argc; i++) {
    const char *a = argv[i];
    if ((strcmp(a, "-c") == 0 || strcmp(a, "--config") == 0) && i + 1 < argc) {
      file = argv[++i];
    } else if (strcmp(a, "-w") == 0 && i + 1 < argc) {
      char *end;
      long n = strtol(argv[++i], &end, 10);
      if (*end || n < 1 || n > 1024) {
        fprintf(stderr, "moongate: -w needs a number of workers from 1 to 1024\n");
        return 1;
      }
      workers = (int)n;
    } else if (strcmp(a, "--watch") == 0) {
      watch = 1;
    } else if (strcmp(a, "--foreground") == 0) {
      /* The default: moongate never detaches; use a service manager to run it. */
    } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      usage(stdout);
      return 0;
    } else {
      fprintf(stderr, "moongate: unknown argument %s\n", a);
      usage(stderr);
      return 1;
    }
  }
  if (strcmp(cmd, "version") == 0) {
    printf("moongate %s\n", MOONGATE_VERSION);
    return 0;
  }
  if (strcmp(cmd, "run") != 0 && strcmp(cmd, "check") != 0 && strcmp(cmd, "stop") != 0 &&
      strcmp(cmd, "reload") != 0) {
    fprintf(stderr, "moongate: unknown command %s\n", cmd);
    usage(stderr);
    return 1;
  }
  mg_config_t cfg;
  memset(&cfg, 0, sizeof cfg);
  if (strcmp(cmd, "run") == 0) mg_config_snapshot(MG_SNAPSHOT_RECORD);
  if (load(file, &cfg) != 0) return strcmp(cmd, "stop") == 0 ? cmd_stop_broken(file) : 1;
  if (strcmp(cmd, "run") == 0) mg_config_snapshot(MG_SNAPSHOT_COMMIT);
  int rc;
  if (strcmp(cmd, "check") == 0) {
    printf("%s: ok\n", cfg.file ? cfg.file : file);
    rc = 0;
  } else if (strcmp(cmd, "stop") == 0) {
    rc = stop_master(cfg.pid_file ? cfg.pid_file : MG_DEFAULT_PID_FILE);
  } else if (strcmp(cmd, "reload") == 0) {
    rc = cmd_reload(&cfg);
  } else {
    int lrc = mg_log_open(cfg.error_log, cfg.log_level);
    if (lrc < 0) {
      fprintf(stderr, "moongate: cannot open error log %s: %s\n", cfg.error_log,
              strerror(-lrc));
      mg_config_free(&cfg);
      return 1;
    }
    rc = mg_master_run(&cfg, workers, watch);
  }
  mg_config_free(&cfg);
  return rc;
}
