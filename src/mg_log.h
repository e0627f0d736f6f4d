/* mg_log: the levelled error log and the JSON access log (one line per request).
 * Each process (master, worker) opens its own file descriptors with O_APPEND, so lines from
 * several workers never interleave inside a line. The access log is buffered per worker and
 * flushed at 32 KiB, every 100 ms (a timer on the worker's loop), and on exit. */
#ifndef MG_LOG_H
#define MG_LOG_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

enum { MG_LOG_DEBUG = 0, MG_LOG_INFO, MG_LOG_WARN, MG_LOG_ERROR, MG_LOG_OFF };

/* Opens the error log: PATH is a file, "stderr" or NULL (stderr). LEVEL is MG_LOG_*. Until
 * it is called, lines of level info and above go to stderr. Calling it again (log rotation)
 * closes the previous file once the new one is open. Returns 0 or a negative errno (the
 * current log is kept). */
int mg_log_open(const char *path, int level);

/* Returns the MG_LOG_* value for "debug", "info", "warn", "error", "off", or -1. */
int mg_log_level_parse(const char *name);

/* Writes one error-log line: "2026-11-27T10:30:19.123Z [warn] pid=123 message\n", in one
 * write(2). Control bytes in the message other than newline and tab are written as \xHH.
 * errno is preserved. */
void mg_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define mg_log_debug(...) mg_log(MG_LOG_DEBUG, __VA_ARGS__)
#define mg_log_info(...) mg_log(MG_LOG_INFO, __VA_ARGS__)
#define mg_log_warn(...) mg_log(MG_LOG_WARN, __VA_ARGS__)
#define mg_log_error(...) mg_log(MG_LOG_ERROR, __VA_ARGS__)

/* One finished request, as the access log records it. Strings need not be NUL-terminated;
 * NULL / 0-length fields are written as null. */
typedef struct mg_access_entry {
  double time;                          /* request start, seconds since the epoch */
  const char *client; size_t client_len;      /* "127.0.0.1:54321" */
  const char *method; size_t method_len;
  const char *target; size_t target_len;      /* raw request target: path and query */
  const char *route; size_t route_len;        /* route name, NULL when none matched */
  int status;
  uint64_t bytes_in, bytes_out;               /* request and response bytes on the wire */
  const char *upstream; size_t upstream_len;  /* "127.0.0.1:9001", NULL when not proxied */
  double upstream_time;                       /* seconds, < 0 when not proxied */
  double total_time;                          /* seconds */
  const char *request_id; size_t request_id_len;
  const char *user_agent; size_t user_agent_len;
  int authorization_present;                  /* logged as "[redacted]" when set */
  int cookie_present;                         /* logged as "[redacted]" when set */
} mg_access_entry_t;

/* Opens the access log on LOOP: PATH is a file, "stdout", or NULL/"off" (disabled).
 * REDACT lists query parameter names whose values are replaced by "[redacted]" in the logged
 * target (matched case-insensitively, after percent-decoding the name; the names are copied).
 * Call it in each worker after fork: the buffer is per process. LOOP may be NULL (no 100 ms
 * timer: flushes at 32 KiB and on mg_access_log_flush only). Calling it again closes the
 * previous log (flushing it to the previous file). Returns 0 or a negative errno (the
 * current log is kept). */
int mg_access_log_open(uv_loop_t *loop, const char *path, char **redact, size_t nredact);

/* Appends one JSON line for E (control bytes and quotes escaped, so a client cannot forge a
 * log line). No-op when the access log is off. */
void mg_access_log_write(const mg_access_entry_t *e);

/* True when the access log is open (lets callers skip building an entry). */
int mg_access_log_enabled(void);

/* Writes out whatever is buffered (called at exit). */
void mg_access_log_flush(void);

/* Flushes and closes the access log and stops its timer (the timer handle is closed on the
 * loop, so run the loop once more before closing it). */
void mg_access_log_close(void);

#endif
