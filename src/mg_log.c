/* mg_log: the levelled error log and the JSON access log.
 *
 * Both logs rely on O_APPEND: the kernel moves every write(2) to the end of the file and
 * writes it in one piece, so lines that each process writes with a single call never mix
 * with another worker's lines. The error log therefore builds each line whole and writes it
 * at once; the access log collects whole lines in a per-process buffer and writes the buffer
 * at once. State is per process and used from its loop thread only, so nothing here locks. */
#include "mg_log.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------------------------------
 * Shared helpers
 * ------------------------------------------------------------------------------------- */

enum {
  MG_LOG_TIME_LEN = 24,              /* "2026-11-27T10:30:19.123Z" */
  MG_LOG_MSG_STACK = 2048,           /* messages up to this size are formatted on the stack */
  MG_LOG_MSG_MAX = 64 * 1024,        /* longer messages are cut (a body logged by mistake) */
  ACCESS_FLUSH_AT = 32 * 1024,       /* the access buffer is written out at this size */
  ACCESS_FLUSH_MS = 100,             /* ... and at least this often */
  ACCESS_POLL_MS = 100,              /* how long a flush waits on a full non-blocking fd */
};

static int open_append(const char *path) {
  int fd;
  do {
    fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
  } while (fd < 0 && errno == EINTR);
  return fd < 0 ? -errno : fd;
}

/* Writes all of BUF to FD; returns 0 or a negative errno. A regular file takes the whole
 * buffer in the first call; the loop is for pipes, signals and descriptors that someone made
 * non-blocking (a full pipe gets a short wait rather than losing the lines at once). */
static int write_all(int fd, const char *buf, size_t len) {
  while (len > 0) {
    ssize_t n = write(fd, buf, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        int ready;
        do {  /* a signal (the Lua watchdog's SIGALRM) cuts poll short: wait again */
          ready = poll(&pfd, 1, ACCESS_POLL_MS);
        } while (ready < 0 && errno == EINTR);
        if (ready > 0) continue;
        return -EAGAIN;
      }
      return -errno;
    }
    buf += n;
    len -= (size_t)n;
  }
  return 0;
}

/* Writes MS (milliseconds since the epoch, UTC) as "2026-11-27T10:30:19.123Z" into OUT, which
 * has room for MG_LOG_TIME_LEN + 1 bytes. */
static void format_time_ms(long long ms, char *out) {
  if (ms < 0 || ms > 253402300799999LL) ms = 0; /* outside years 1970..9999 */
  time_t sec = (time_t)(ms / 1000);
  struct tm tm;
  gmtime_r(&sec, &tm);
  /* Fields are written one by one because snprintf's range checks cannot see that gmtime
   * keeps each of them to its width. */
  int v[7] = {tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
              (int)(ms % 1000)};
  static const int width[7] = {4, 2, 2, 2, 2, 2, 3};
  static const char sep[7] = {'-', '-', 'T', ':', ':', '.', 'Z'};
  char *p = out;
  for (int i = 0; i < 7; i++) {
    for (int d = width[i] - 1; d >= 0; d--) {
      p[d] = (char)('0' + v[i] % 10);
      v[i] /= 10;
    }
    p += width[i];
    *p++ = sep[i];
  }
  *p = '\0';
}

/* ---------------------------------------------------------------------------------------
 * Error log
 * ------------------------------------------------------------------------------------- */

static int err_fd = STDERR_FILENO;
static int err_level = MG_LOG_INFO;

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

int mg_log_open(const char *path, int level) {
  if (level < MG_LOG_DEBUG || level > MG_LOG_OFF) return -EINVAL;
  int fd = STDERR_FILENO;
  if (path && strcmp(path, "stderr") != 0) {
    fd = open_append(path);
    if (fd < 0) return fd;
  }
  /* Reopening (log rotation) swaps the descriptor only once the new one is open. */
  if (err_fd != STDERR_FILENO) close(err_fd);
  err_fd = fd;
  err_level = level;
  return 0;
}

int mg_log_level_parse(const char *name) {
  if (!name) return -1;
  for (int i = MG_LOG_DEBUG; i <= MG_LOG_OFF; i++) {
    if (strcmp(name, level_names[i]) == 0) return i;
  }
  return -1;
}

/* Copies SRC into DST, writing control bytes other than newline and tab as "\xHH", so text
 * that came from a client cannot move the cursor or forge anything on an operator's
 * terminal. DST has room for 4 * LEN bytes. Returns the bytes written. */
static size_t copy_sanitized(char *dst, const char *src, size_t len) {
  static const char hex[] = "0123456789abcdef";
  char *p = dst;
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)src[i];
    if ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7f) {
      *p++ = '\\';
      *p++ = 'x';
      *p++ = hex[c >> 4];
      *p++ = hex[c & 15];
    } else {
      *p++ = (char)c;
    }
  }
  return (size_t)(p - dst);
}

void mg_log(int level, const char *fmt, ...) {
  if (level < err_level || level < MG_LOG_DEBUG || level >= MG_LOG_OFF) return;
  int saved_errno = errno; /* callers log and then look at errno */

  char stack_msg[MG_LOG_MSG_STACK];
  char *heap_msg = NULL;
  const char *msg = stack_msg;
  size_t msg_len;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(stack_msg, sizeof(stack_msg), fmt, ap);
  va_end(ap);
  if (n < 0) {
    msg = "(unformattable log message)";
    msg_len = strlen(msg);
  } else if ((size_t)n < sizeof(stack_msg)) {
    msg_len = (size_t)n;
  } else {
    size_t want = (size_t)n < MG_LOG_MSG_MAX ? (size_t)n : MG_LOG_MSG_MAX;
    heap_msg = malloc(want + 1);
    if (heap_msg) {
      va_start(ap, fmt);
      vsnprintf(heap_msg, want + 1, fmt, ap);
      va_end(ap);
      msg = heap_msg;
      msg_len = want;
    } else {
      msg_len = sizeof(stack_msg) - 1;
    }
  }
  /* The line ends with exactly one newline, whatever the message ended with. */
  while (msg_len > 0 && msg[msg_len - 1] == '\n') msg_len--;

  char head[MG_LOG_TIME_LEN + 64];
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  format_time_ms((long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000, head);
  int head_len = MG_LOG_TIME_LEN;
  head_len += snprintf(head + head_len, sizeof(head) - (size_t)head_len, " [%s] pid=%ld ",
                       level_names[level], (long)getpid());

  char stack_line[MG_LOG_MSG_STACK * 2];
  size_t need = (size_t)head_len + msg_len * 4 + 1;
  char *line = need <= sizeof(stack_line) ? stack_line : malloc(need);
  if (!line) { /* out of memory: log the start of the message rather than nothing */
    line = stack_line;
    size_t room = (sizeof(stack_line) - (size_t)head_len - 1) / 4;
    if (msg_len > room) msg_len = room;
  }
  memcpy(line, head, (size_t)head_len);
  size_t len = (size_t)head_len + copy_sanitized(line + head_len, msg, msg_len);
  line[len++] = '\n';
  (void)write_all(err_fd, line, len); /* nowhere left to report a failure to */

  if (line != stack_line) free(line);
  free(heap_msg);
  errno = saved_errno;
}

/* ---------------------------------------------------------------------------------------
 * Access log
 * ------------------------------------------------------------------------------------- */

static struct {
  int fd;             /* -1: the access log is off */
  int owns_fd;        /* 0 for stdout */
  int is_pipe;        /* pipes and sockets are written in PIPE_BUF pieces, see flush */
  int write_failed;   /* a write error was reported and none has succeeded since */
  uv_timer_t *timer;  /* heap-allocated: a reopen may come before the old close callback */
  char *buf;
  size_t len, cap;
  int oom;            /* the line being built could not get memory: it is dropped */
  char **redact;
  size_t nredact;
} acc = {.fd = -1};

static void on_timer_close(uv_handle_t *h) { free(h); }

static void on_flush_timer(uv_timer_t *t) { mg_access_log_flush(); }

static void free_names(char **names, size_t n) {
  for (size_t i = 0; i < n; i++) free(names[i]);
  free(names);
}

int mg_access_log_open(uv_loop_t *loop, const char *path, char **redact, size_t nredact) {
  /* Everything new is set up before the old log is closed, so a failure changes nothing. */
  char **names = NULL;
  size_t nnames = 0;
  if (nredact > 0) {
    names = calloc(nredact, sizeof(*names));
    if (!names) return -ENOMEM;
    for (size_t i = 0; i < nredact; i++) {
      if (!redact[i] || !redact[i][0]) continue;
      names[nnames] = strdup(redact[i]);
      if (!names[nnames]) {
        free_names(names, nnames);
        return -ENOMEM;
      }
      nnames++;
    }
  }

  int fd = -1, owns_fd = 0;
  if (path && strcmp(path, "off") != 0) {
    if (strcmp(path, "stdout") == 0) {
      fd = STDOUT_FILENO;
    } else {
      fd = open_append(path);
      if (fd < 0) {
        free_names(names, nnames);
        return fd;
      }
      owns_fd = 1;
    }
  }

  uv_timer_t *timer = NULL;
  if (fd >= 0 && loop) {
    timer = malloc(sizeof(*timer));
    int rc = timer ? uv_timer_init(loop, timer) : UV_ENOMEM;
    if (rc < 0) {
      free(timer);
      if (owns_fd) close(fd);
      free_names(names, nnames);
      return rc == UV_ENOMEM ? -ENOMEM : rc;
    }
    uv_timer_start(timer, on_flush_timer, ACCESS_FLUSH_MS, ACCESS_FLUSH_MS);
    uv_unref((uv_handle_t *)timer); /* the log never keeps a loop alive by itself */
  }

  mg_access_log_close();
  struct stat st;
  acc.fd = fd;
  acc.owns_fd = owns_fd;
  acc.is_pipe = fd >= 0 && fstat(fd, &st) == 0 && (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode));
  acc.write_failed = 0;
  acc.timer = timer;
  acc.redact = names;
  acc.nredact = nnames;
  return 0;
}

/* Writes LEN bytes of whole lines to a pipe in writes of at most PIPE_BUF bytes where the
 * lines allow it: only such writes are atomic on a pipe, so this is what keeps two workers
 * that share stdout from splitting each other's lines. (A single line longer than PIPE_BUF
 * cannot be protected.) */
static int write_lines(int fd, const char *buf, size_t len) {
  size_t off = 0;
  while (off < len) {
    size_t end = off;
    while (end < len) {
      const char *nl = memchr(buf + end, '\n', len - end);
      size_t next = nl ? (size_t)(nl - buf) + 1 : len;
      if (next - off > PIPE_BUF && end > off) break;
      end = next;
    }
    int rc = write_all(fd, buf + off, end - off);
    if (rc < 0) return rc;
    off = end;
  }
  return 0;
}

void mg_access_log_flush(void) {
  if (acc.fd < 0 || acc.len == 0) return;
  int rc = acc.is_pipe ? write_lines(acc.fd, acc.buf, acc.len)
                       : write_all(acc.fd, acc.buf, acc.len);
  acc.len = 0;
  /* One huge line grew the buffer: give the memory back rather than hold it forever. */
  if (acc.cap > 4 * ACCESS_FLUSH_AT) {
    free(acc.buf);
    acc.buf = NULL;
    acc.cap = 0;
  }
  if (rc < 0 && !acc.write_failed) {
    acc.write_failed = 1; /* reported once per outage, not once per flush */
    mg_log_error("access log: write failed, lines lost: %s", strerror(-rc));
  } else if (rc == 0) {
    acc.write_failed = 0;
  }
}

void mg_access_log_close(void) {
  mg_access_log_flush();
  if (acc.timer) {
    uv_timer_stop(acc.timer);
    uv_close((uv_handle_t *)acc.timer, on_timer_close);
    acc.timer = NULL;
  }
  if (acc.owns_fd) close(acc.fd);
  acc.fd = -1;
  acc.owns_fd = 0;
  free(acc.buf);
  acc.buf = NULL;
  acc.len = acc.cap = 0;
  free_names(acc.redact, acc.nredact);
  acc.redact = NULL;
  acc.nredact = 0;
}

/* ---- building one line ---------------------------------------------------------------- */

/* Makes room for N more bytes; on failure sets acc.oom and returns 0. */
static int reserve(size_t n) {
  if (acc.oom) return 0;
  if (acc.cap - acc.len >= n) return 1;
  size_t cap = acc.cap ? acc.cap : ACCESS_FLUSH_AT + 4096;
  while (cap - acc.len < n) cap *= 2;
  char *p = realloc(acc.buf, cap);
  if (!p) {
    acc.oom = 1;
    return 0;
  }
  acc.buf = p;
  acc.cap = cap;
  return 1;
}

static void put_raw(const char *s, size_t n) {
  if (!reserve(n)) return;
  memcpy(acc.buf + acc.len, s, n);
  acc.len += n;
}

#define PUT_LIT(s) put_raw(s, sizeof(s) - 1)

/* Returns the length of the well-formed UTF-8 sequence (2 to 4 bytes) at S, or 0 when the
 * bytes there are not one (overlong forms, surrogates and code points past U+10FFFF count as
 * malformed, per RFC 3629). */
static size_t utf8_len(const unsigned char *s, size_t n) {
  unsigned char c = s[0];
  size_t len;
  unsigned char lo = 0x80, hi = 0xbf; /* allowed range of the second byte */
  if (c >= 0xc2 && c <= 0xdf) {
    len = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    len = 3;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    len = 4;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
  } else {
    return 0;
  }
  if (n < len || s[1] < lo || s[1] > hi) return 0;
  for (size_t i = 2; i < len; i++) {
    if ((s[i] & 0xc0) != 0x80) return 0;
  }
  return len;
}

/* Appends S as the inside of a JSON string. Quotes, backslashes and every control byte are
 * escaped; a byte that does not start well-formed UTF-8 is written as \u00XX, so the line
 * stays valid JSON whatever a client sent (it reads back as the Latin-1 character). */
static void put_escaped(const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  if (!reserve(n * 6)) return;
  const unsigned char *u = (const unsigned char *)s;
  char *p = acc.buf + acc.len;
  for (size_t i = 0; i < n;) {
    unsigned char c = u[i];
    if (c >= 0x80) {
      size_t len = utf8_len(u + i, n - i);
      if (len) {
        memcpy(p, u + i, len);
        p += len;
        i += len;
        continue;
      }
    }
    i++;
    if (c == '"' || c == '\\') {
      *p++ = '\\';
      *p++ = (char)c;
    } else if (c >= 0x20 && c < 0x7f) {
      *p++ = (char)c;
    } else if (c == '\n') {
      *p++ = '\\';
      *p++ = 'n';
    } else if (c == '\r') {
      *p++ = '\\';
      *p++ = 'r';
    } else if (c == '\t') {
      *p++ = '\\';
      *p++ = 't';
    } else { /* other control bytes, DEL, and bytes that are not UTF-8 */
      memcpy(p, "\\u00", 4);
      p[4] = hex[c >> 4];
      p[5] = hex[c & 15];
      p += 6;
    }
  }
  acc.len = (size_t)(p - acc.buf);
}

/* Appends ,"KEY":"S" or ,"KEY":null when S is NULL or empty. KEY includes the comma. */
static void put_string_field(const char *key, const char *s, size_t n) {
  put_raw(key, strlen(key));
  if (!s || n == 0) {
    PUT_LIT("null");
    return;
  }
  PUT_LIT("\"");
  put_escaped(s, n);
  PUT_LIT("\"");
}

/* Appends ,"KEY":V with V in seconds to the millisecond, or null when V is negative or not a
 * number. */
static void put_seconds_field(const char *key, double v) {
  char num[64];
  int n = v >= 0 ? snprintf(num, sizeof(num), "%.3f", v) : -1;
  put_raw(key, strlen(key));
  if (n > 0 && (size_t)n < sizeof(num) && isfinite(v))
    put_raw(num, (size_t)n);
  else
    PUT_LIT("null");
}

static int hex_value(unsigned char c) {
  if (c >= '0' && c <= '9') return c - '0';
  c |= 0x20;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

static unsigned char ascii_lower(unsigned char c) {
  return (c >= 'A' && c <= 'Z') ? (unsigned char)(c | 0x20) : c;
}

/* Whether query parameter NAME (as sent, N bytes) is on the redact list. The name is
 * percent-decoded first, so "api%4Bey" cannot smuggle a key past "apikey". */
static int is_redacted(const char *name, size_t n) {
  for (size_t r = 0; r < acc.nredact; r++) {
    const unsigned char *want = (const unsigned char *)acc.redact[r];
    size_t i = 0, j = 0;
    for (; i < n && want[j]; j++) {
      unsigned char c = (unsigned char)name[i];
      int hi, lo;
      if (c == '%' && i + 2 < n && (hi = hex_value((unsigned char)name[i + 1])) >= 0 &&
          (lo = hex_value((unsigned char)name[i + 2])) >= 0) {
        c = (unsigned char)(hi << 4 | lo);
        i += 3;
      } else {
        i++;
      }
      if (ascii_lower(c) != ascii_lower(want[j])) break;
    }
    if (i == n && !want[j]) return 1;
  }
  return 0;
}

/* Appends the request target with the values of redacted query parameters replaced. Every
 * occurrence is replaced, and everything after the first '?' counts as query (a '#' does not
 * end it), so that a key is never written out by a parsing difference. */
static void put_target(const char *t, size_t n) {
  const char *q = acc.nredact ? memchr(t, '?', n) : NULL;
  if (!q) {
    put_escaped(t, n);
    return;
  }
  const char *end = t + n, *p = q + 1;
  put_escaped(t, (size_t)(p - t));
  for (;;) {
    const char *amp = memchr(p, '&', (size_t)(end - p));
    if (!amp) amp = end;
    const char *eq = memchr(p, '=', (size_t)(amp - p));
    if (eq && is_redacted(p, (size_t)(eq - p))) {
      put_escaped(p, (size_t)(eq - p) + 1);
      PUT_LIT("[redacted]");
    } else {
      put_escaped(p, (size_t)(amp - p));
    }
    if (amp == end) break;
    PUT_LIT("&");
    p = amp + 1;
  }
}

int mg_access_log_enabled(void) { return acc.fd >= 0; }

void mg_access_log_write(const mg_access_entry_t *e) {
  if (acc.fd < 0) return;
  size_t start = acc.len;
  char num[128];

  char when[MG_LOG_TIME_LEN + 1];
  format_time_ms(e->time >= 0 && e->time < 253402300800.0 ? llround(e->time * 1000.0) : 0,
                 when);
  PUT_LIT("{\"time\":\"");
  put_raw(when, MG_LOG_TIME_LEN);
  PUT_LIT("\"");
  put_string_field(",\"client\":", e->client, e->client_len);
  put_string_field(",\"method\":", e->method, e->method_len);
  PUT_LIT(",\"path\":");
  if (e->target && e->target_len) {
    PUT_LIT("\"");
    put_target(e->target, e->target_len);
    PUT_LIT("\"");
  } else {
    PUT_LIT("null");
  }
  put_string_field(",\"route\":", e->route, e->route_len);
  int n = snprintf(num, sizeof(num), ",\"status\":%d,\"bytes_in\":%llu,\"bytes_out\":%llu",
                   e->status, (unsigned long long)e->bytes_in, (unsigned long long)e->bytes_out);
  put_raw(num, (size_t)n);
  put_string_field(",\"upstream\":", e->upstream, e->upstream_len);
  put_seconds_field(",\"upstream_time\":", e->upstream_time);
  put_seconds_field(",\"total_time\":", e->total_time);
  put_string_field(",\"request_id\":", e->request_id, e->request_id_len);
  put_string_field(",\"user_agent\":", e->user_agent, e->user_agent_len);
  if (e->authorization_present) PUT_LIT(",\"authorization\":\"[redacted]\"");
  if (e->cookie_present) PUT_LIT(",\"cookie\":\"[redacted]\"");
  PUT_LIT("}\n");

  if (acc.oom) { /* a partial line would break the JSON of the file: drop it whole */
    acc.len = start;
    acc.oom = 0;
    return;
  }
  if (acc.len >= ACCESS_FLUSH_AT) mg_access_log_flush();
}
