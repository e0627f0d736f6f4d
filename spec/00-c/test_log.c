/* Tests for mg_log: the error-log line format and level filter, and the access log's exact
 * JSON text (escaping, invalid UTF-8, redaction, null fields) and its flushing. */
#include "mg_log.h"
#include "mg_test.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <yajl/yajl_tree.h>

static char tmp_path[64];

/* Creates an empty temporary file and remembers its path in tmp_path. */
static const char *temp_file(void) {
  strcpy(tmp_path, "/tmp/mg_test_log_XXXXXX");
  int fd = mkstemp(tmp_path);
  if (fd < 0) MG_FAIL("mkstemp: %s", strerror(errno));
  close(fd);
  return tmp_path;
}

/* Reads the whole file at PATH into a static buffer (NUL-terminated); returns its length. */
static char file_buf[1 << 20];
static size_t read_file(const char *path) {
  int fd = open(path, O_RDONLY);
  if (fd < 0) MG_FAIL("open %s: %s", path, strerror(errno));
  size_t len = 0;
  ssize_t n;
  while ((n = read(fd, file_buf + len, sizeof(file_buf) - 1 - len)) > 0) len += (size_t)n;
  close(fd);
  file_buf[len] = '\0';
  return len;
}

/* Checks that every line of file_buf parses as a JSON object. */
static void check_json_lines(void) {
  char err[256];
  for (char *line = file_buf; *line;) {
    char *nl = strchr(line, '\n');
    MG_CHECK(nl != NULL);
    *nl = '\0';
    yajl_val v = yajl_tree_parse(line, err, sizeof(err));
    if (!v) MG_FAIL("not JSON (%s): %s", err, line);
    int is_object = YAJL_IS_OBJECT(v);
    yajl_tree_free(v);
    *nl = '\n';
    MG_CHECK(is_object);
    line = nl + 1;
  }
}

/* Sets a string field and its length from a literal. */
#define S2(f, lit) .f = lit, .f##_len = sizeof(lit) - 1

/* ---- error log ------------------------------------------------------------------------- */

static void test_level_parse(void) {
  MG_CHECK_INT(mg_log_level_parse("debug"), MG_LOG_DEBUG);
  MG_CHECK_INT(mg_log_level_parse("info"), MG_LOG_INFO);
  MG_CHECK_INT(mg_log_level_parse("warn"), MG_LOG_WARN);
  MG_CHECK_INT(mg_log_level_parse("error"), MG_LOG_ERROR);
  MG_CHECK_INT(mg_log_level_parse("off"), MG_LOG_OFF);
  MG_CHECK_INT(mg_log_level_parse("WARN"), -1);
  MG_CHECK_INT(mg_log_level_parse("warning"), -1);
  MG_CHECK_INT(mg_log_level_parse(""), -1);
  MG_CHECK_INT(mg_log_level_parse(NULL), -1);
}

/* Checks that LINE starts with a timestamp of about now and returns what follows it. */
static const char *skip_timestamp(const char *line) {
  struct tm tm = {0};
  const char *rest = strptime(line, "%Y-%m-%dT%H:%M:%S", &tm);
  MG_CHECK(rest == line + 19);
  MG_CHECK(rest[0] == '.' && rest[1] >= '0' && rest[1] <= '9' && rest[2] >= '0' &&
           rest[2] <= '9' && rest[3] >= '0' && rest[3] <= '9' && rest[4] == 'Z');
  long long diff = (long long)timegm(&tm) - (long long)time(NULL);
  MG_CHECK(diff >= -5 && diff <= 1);
  return line + 24;
}

static void test_error_log_format_and_filter(void) {
  const char *path = temp_file();
  MG_CHECK_INT(mg_log_open(path, MG_LOG_WARN), 0);
  mg_log_debug("not shown %d", 1);
  mg_log_info("not shown %d", 2);
  errno = ENOSPC;
  mg_log_warn("careful: %d%%", 42);
  MG_CHECK_INT(errno, ENOSPC); /* logging leaves errno alone */
  mg_log_error("bad\x1b[31m\tthing\r\n");
  mg_log(MG_LOG_OFF, "never");
  mg_log(-1, "never");
  mg_log(77, "never");
  MG_CHECK_INT(mg_log_open("/dev/null", MG_LOG_INFO), 0); /* the file is closed: */
  mg_log_warn("to /dev/null now, not the file");
  MG_CHECK_INT(mg_log_open(NULL, MG_LOG_INFO), 0);

  read_file(path);
  unlink(path);
  char expect[256];
  char *line2 = strchr(file_buf, '\n');
  MG_CHECK(line2 != NULL);
  line2++;
  snprintf(expect, sizeof(expect), " [warn] pid=%ld careful: 42%%\n", (long)getpid());
  MG_CHECK_MEM(skip_timestamp(file_buf), (size_t)(line2 - file_buf) - 24, expect);
  snprintf(expect, sizeof(expect), " [error] pid=%ld bad\\x1b[31m\tthing\\x0d\n",
           (long)getpid());
  MG_CHECK_STR(skip_timestamp(line2), expect);
}

static void test_error_log_long_message(void) {
  const char *path = temp_file();
  static char big[10000];
  memset(big, 'x', sizeof(big) - 1);
  MG_CHECK_INT(mg_log_open(path, MG_LOG_DEBUG), 0);
  mg_log_debug("<%s>", big);
  MG_CHECK_INT(mg_log_open("stderr", MG_LOG_INFO), 0);
  size_t len = read_file(path);
  unlink(path);
  char *lt = strchr(file_buf, '<');
  MG_CHECK(lt != NULL);
  MG_CHECK_INT(len - (size_t)(lt - file_buf), sizeof(big) + 2); /* <, 9999 x, >, \n */
  MG_CHECK(lt[sizeof(big)] == '>' && lt[sizeof(big) + 1] == '\n');
}

static void test_error_log_open_errors(void) {
  MG_CHECK_INT(mg_log_open("/nonexistent-dir/mg.log", MG_LOG_INFO), -ENOENT);
  MG_CHECK_INT(mg_log_open(NULL, MG_LOG_OFF + 1), -EINVAL);
  MG_CHECK_INT(mg_log_open(NULL, -1), -EINVAL);
}

/* ---- access log ------------------------------------------------------------------------ */

static uv_loop_t loop;

/* Closes the access log and lets the loop close its timer. */
static void close_access_log(void) {
  mg_access_log_close();
  uv_run(&loop, UV_RUN_NOWAIT);
}

static mg_access_entry_t full_entry(void) {
  mg_access_entry_t e = {
      .time = 1795775419.123,
      S2(client, "127.0.0.1:54321"),
      S2(method, "GET"),
      S2(target, "/users/7?expand=1"),
      S2(route, "GET /users/:id"),
      .status = 200,
      .bytes_in = 78,
      .bytes_out = 1234,
      S2(upstream, "127.0.0.1:9001"),
      .upstream_time = 0.012,
      .total_time = 0.0153,
      S2(request_id, "r-1"),
      S2(user_agent, "curl/8.0"),
  };
  return e;
}

static void test_access_full_line(void) {
  const char *path = temp_file();
  MG_CHECK_INT(mg_access_log_open(&loop, path, NULL, 0), 0);
  mg_access_entry_t e = full_entry();
  mg_access_log_write(&e);
  e.authorization_present = 1;
  e.cookie_present = 1;
  e.status = 404;
  e.time = 1795775419.9996; /* rounds to the next second */
  mg_access_log_write(&e);
  MG_CHECK_INT(read_file(path), 0); /* still buffered */
  mg_access_log_flush();
  read_file(path);
  MG_CHECK_STR(file_buf,
               "{\"time\":\"2026-11-27T10:30:19.123Z\",\"client\":\"127.0.0.1:54321\","
               "\"method\":\"GET\",\"path\":\"/users/7?expand=1\",\"route\":\"GET /users/:id\","
               "\"status\":200,\"bytes_in\":78,\"bytes_out\":1234,\"upstream\":\"127.0.0.1:9001\","
               "\"upstream_time\":0.012,\"total_time\":0.015,\"request_id\":\"r-1\","
               "\"user_agent\":\"curl/8.0\"}\n"
               "{\"time\":\"2026-11-27T10:30:20.000Z\",\"client\":\"127.0.0.1:54321\","
               "\"method\":\"GET\",\"path\":\"/users/7?expand=1\",\"route\":\"GET /users/:id\","
               "\"status\":404,\"bytes_in\":78,\"bytes_out\":1234,\"upstream\":\"127.0.0.1:9001\","
               "\"upstream_time\":0.012,\"total_time\":0.015,\"request_id\":\"r-1\","
               "\"user_agent\":\"curl/8.0\",\"authorization\":\"[redacted]\","
               "\"cookie\":\"[redacted]\"}\n");
  check_json_lines();
  close_access_log();
  unlink(path);
}

static void test_access_null_fields(void) {
  const char *path = temp_file();
  MG_CHECK_INT(mg_access_log_open(&loop, path, NULL, 0), 0);
  mg_access_entry_t e = {.time = 0, .status = 400, .upstream_time = -1, .total_time = 0.25,
                         .route = "ignored", .route_len = 0, .bytes_out = 18446744073709551615u};
  mg_access_log_write(&e);
  mg_access_log_flush();
  read_file(path);
  MG_CHECK_STR(file_buf,
               "{\"time\":\"1970-01-01T00:00:00.000Z\",\"client\":null,\"method\":null,"
               "\"path\":null,\"route\":null,\"status\":400,\"bytes_in\":0,"
               "\"bytes_out\":18446744073709551615,\"upstream\":null,\"upstream_time\":null,"
               "\"total_time\":0.250,\"request_id\":null,\"user_agent\":null}\n");
  check_json_lines();
  close_access_log();
  unlink(path);
}

static void test_access_escaping(void) {
  const char *path = temp_file();
  MG_CHECK_INT(mg_access_log_open(&loop, path, NULL, 0), 0);
  /* A client tries to end the JSON string and start a forged line, and sends every kind of
   * byte that could break the file: controls, DEL, and malformed UTF-8 of each sort. */
  static const char ua[] = "a\"b\\c\n{\"x\":1}\r\t\x01\x1f\x7f|"
                           "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80|"   /* é € 😀: kept */
                           "\xff\xc3(\xc0\xaf\xed\xa0\x80\x80\xf4\x90\x80\x80|\xe2\x82";
  static const char target[] = "/p\"q\\\x00z";
  mg_access_entry_t e = {.time = 1, .status = 200, .upstream_time = -1, .total_time = 0,
                         .user_agent = ua, .user_agent_len = sizeof(ua) - 1,
                         .target = target, .target_len = sizeof(target) - 1,
                         .method = "G\xe9T", .method_len = 3};
  mg_access_log_write(&e);
  mg_access_log_flush();
  read_file(path);
  MG_CHECK_STR(file_buf,
               "{\"time\":\"1970-01-01T00:00:01.000Z\",\"client\":null,\"method\":\"G\\u00e9T\","
               "\"path\":\"/p\\\"q\\\\\\u0000z\",\"route\":null,\"status\":200,\"bytes_in\":0,"
               "\"bytes_out\":0,\"upstream\":null,\"upstream_time\":null,\"total_time\":0.000,"
               "\"request_id\":null,\"user_agent\":\"a\\\"b\\\\c\\n{\\\"x\\\":1}\\r\\t\\u0001"
               "\\u001f\\u007f|\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80|\\u00ff\\u00c3(\\u00c0"
               "\\u00af\\u00ed\\u00a0\\u0080\\u0080\\u00f4\\u0090\\u0080\\u0080|\\u00e2"
               "\\u0082\"}\n");
  check_json_lines();
  close_access_log();
  unlink(path);
}

static void test_access_redaction(void) {
  const char *path = temp_file();
  char *redact[] = {"apikey", "Token", ""};
  MG_CHECK_INT(mg_access_log_open(&loop, path, redact, 3), 0);
  static const char *targets[] = {
      "/a?apikey=secret&x=1",
      "/a?x=1&APIKEY=two&apikey=three&ApiKey=",
      "/a?api%4bey=enc&apikeyx=4&xapikey=5&token&token=t&q=apikey=no&apikey",
      "/no/query/apikey=1",
      "/a?apikey=s#frag&apikey=t",
      "/a?&&apikey=\"quoted\"&",
      "/a?x=1",
  };
  for (size_t i = 0; i < sizeof(targets) / sizeof(targets[0]); i++) {
    mg_access_entry_t e = {.time = 0, .status = 200, .upstream_time = -1,
                           .target = targets[i], .target_len = strlen(targets[i])};
    mg_access_log_write(&e);
  }
  mg_access_log_flush();
  read_file(path);
  check_json_lines();
  static const char *expect[] = {
      "/a?apikey=[redacted]&x=1",
      "/a?x=1&APIKEY=[redacted]&apikey=[redacted]&ApiKey=[redacted]",
      "/a?api%4bey=[redacted]&apikeyx=4&xapikey=5&token&token=[redacted]&q=apikey=no&apikey",
      "/no/query/apikey=1",
      "/a?apikey=[redacted]&apikey=[redacted]",
      "/a?&&apikey=[redacted]&",
      "/a?x=1",
  };
  char *line = file_buf;
  for (size_t i = 0; i < sizeof(expect) / sizeof(expect[0]); i++) {
    char *p = strstr(line, "\"path\":\"");
    MG_CHECK(p != NULL);
    p += 8;
    char *q = strstr(p, "\",\"route\"");
    MG_CHECK(q != NULL);
    MG_CHECK_MEM(p, (size_t)(q - p), expect[i]);
    line = strchr(q, '\n') + 1;
  }
  MG_CHECK_STR(line, "");
  close_access_log();
  unlink(path);
}

static int timer_fired;
static void on_test_timer(uv_timer_t *t) { timer_fired = 1; }

static void test_access_flush_by_timer(void) {
  const char *path = temp_file();
  MG_CHECK_INT(mg_access_log_open(&loop, path, NULL, 0), 0);
  /* The log's timer alone does not keep the loop running. */
  uv_update_time(&loop);
  uint64_t t0 = uv_now(&loop);
  MG_CHECK_INT(uv_run(&loop, UV_RUN_DEFAULT), 0);
  MG_CHECK(uv_now(&loop) - t0 < 50);
  mg_access_entry_t e = full_entry();
  mg_access_log_write(&e);
  MG_CHECK_INT(read_file(path), 0);
  uv_timer_t t;
  timer_fired = 0;
  uv_timer_init(&loop, &t);
  uv_timer_start(&t, on_test_timer, 150, 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  MG_CHECK(timer_fired);
  MG_CHECK(read_file(path) > 100); /* the 100 ms flush ran before our 150 ms timer */
  MG_CHECK(file_buf[strlen(file_buf) - 1] == '\n');
  uv_close((uv_handle_t *)&t, NULL);
  close_access_log();
  unlink(path);
}

static void test_access_flush_at_32k(void) {
  const char *path = temp_file();
  MG_CHECK_INT(mg_access_log_open(&loop, path, NULL, 0), 0);
  mg_access_entry_t e = full_entry();
  int written = 0;
  size_t len = 0;
  while (written < 1000 && (len = read_file(path)) == 0) {
    mg_access_log_write(&e);
    written++;
  }
  MG_CHECK(len >= 32 * 1024 && len < 40 * 1024);
  MG_CHECK(file_buf[len - 1] == '\n'); /* only whole lines are written */
  mg_access_log_write(&e);
  close_access_log(); /* close writes the rest */
  read_file(path);
  int lines = 0;
  for (char *p = file_buf; (p = strchr(p, '\n')); p++) lines++;
  MG_CHECK_INT(lines, written + 1);
  check_json_lines();
  unlink(path);
}

static void test_access_stdout(void) {
  const char *path = temp_file();
  fflush(stdout);
  int saved = dup(STDOUT_FILENO);
  int fd = open(path, O_WRONLY | O_APPEND);
  MG_CHECK(saved >= 0 && fd >= 0);
  dup2(fd, STDOUT_FILENO);
  close(fd);
  int rc = mg_access_log_open(&loop, "stdout", NULL, 0);
  mg_access_entry_t e = full_entry();
  mg_access_log_write(&e);
  close_access_log();
  int still_open = fcntl(STDOUT_FILENO, F_GETFD) != -1; /* the log must not close fd 1 */
  dup2(saved, STDOUT_FILENO);
  close(saved);
  MG_CHECK_INT(rc, 0);
  MG_CHECK(still_open);
  read_file(path);
  unlink(path);
  MG_CHECK(strncmp(file_buf, "{\"time\":\"2026-11-27T10:30:19.123Z\"", 34) == 0);
  check_json_lines();
}

static void test_access_off_and_errors(void) {
  mg_access_entry_t e = full_entry();
  MG_CHECK_INT(mg_access_log_open(&loop, NULL, NULL, 0), 0);
  mg_access_log_write(&e); /* no-ops */
  mg_access_log_flush();
  MG_CHECK_INT(mg_access_log_open(&loop, "off", NULL, 0), 0);
  mg_access_log_write(&e);

  /* A failed open leaves the current log in place. */
  const char *path = temp_file();
  MG_CHECK_INT(mg_access_log_open(&loop, path, NULL, 0), 0);
  MG_CHECK_INT(mg_access_log_open(&loop, "/nonexistent-dir/access.log", NULL, 0), -ENOENT);
  mg_access_log_write(&e);
  mg_access_log_flush();
  MG_CHECK(read_file(path) > 100);

  /* Reopening (rotation) writes the old buffer to the old file first. */
  char old_path[64];
  strcpy(old_path, path);
  mg_access_log_write(&e);
  const char *new_path = temp_file();
  MG_CHECK_INT(mg_access_log_open(&loop, new_path, NULL, 0), 0);
  mg_access_log_write(&e);
  close_access_log();
  size_t old_len = read_file(old_path);
  size_t new_len = read_file(new_path);
  MG_CHECK(new_len > 100);
  MG_CHECK_INT(old_len, 2 * new_len);
  unlink(old_path);
  unlink(new_path);

  /* Without a loop there is no timer; explicit flushes still work. */
  path = temp_file();
  MG_CHECK_INT(mg_access_log_open(NULL, path, NULL, 0), 0);
  mg_access_log_write(&e);
  mg_access_log_close();
  MG_CHECK(read_file(path) > 100);
  unlink(path);

  struct stat st;
  path = temp_file();
  unlink(path);
  MG_CHECK_INT(mg_access_log_open(&loop, path, NULL, 0), 0); /* creates the file, 0644 */
  close_access_log();
  MG_CHECK_INT(stat(path, &st), 0);
  MG_CHECK_INT(st.st_mode & 0777, 0644); /* main set umask 022 */
  unlink(path);
}

/* Redirects fd 1 to a pipe and returns the read end, with the old fd 1 in *SAVED. */
static int stdout_to_pipe(int *saved) {
  int fds[2];
  fflush(stdout);
  if (pipe(fds) != 0) MG_FAIL("pipe: %s", strerror(errno));
  *saved = dup(STDOUT_FILENO);
  dup2(fds[1], STDOUT_FILENO);
  close(fds[1]);
  return fds[0];
}

static void restore_stdout(int saved) {
  dup2(saved, STDOUT_FILENO);
  close(saved);
}

static void test_access_pipe_keeps_lines_whole(void) {
  int saved, rd = stdout_to_pipe(&saved);
  int rc = mg_access_log_open(&loop, "stdout", NULL, 0);
  /* Lines of about 1.5 KiB: the flush goes out in PIPE_BUF pieces cut between lines. */
  static char ua[1500];
  memset(ua, 'u', sizeof(ua));
  mg_access_entry_t e = full_entry();
  e.user_agent = ua;
  e.user_agent_len = sizeof(ua);
  for (int i = 0; i < 20; i++) mg_access_log_write(&e);
  close_access_log();
  restore_stdout(saved);
  size_t len = 0;
  ssize_t n;
  while ((n = read(rd, file_buf + len, sizeof(file_buf) - 1 - len)) > 0) len += (size_t)n;
  close(rd);
  file_buf[len] = '\0';
  MG_CHECK_INT(rc, 0);
  int lines = 0;
  for (char *p = file_buf; (p = strchr(p, '\n')); p++) lines++;
  MG_CHECK_INT(lines, 20);
  check_json_lines();
}

static void test_access_write_error_reported_once(void) {
  const char *path = temp_file();
  char err_path[64];
  strcpy(err_path, path);
  MG_CHECK_INT(mg_log_open(err_path, MG_LOG_INFO), 0);
  int saved, rd = stdout_to_pipe(&saved);
  close(rd); /* nobody reads: writes fail with EPIPE (SIGPIPE is ignored in main) */
  int rc = mg_access_log_open(&loop, "stdout", NULL, 0);
  mg_access_entry_t e = full_entry();
  mg_access_log_write(&e);
  mg_access_log_flush();
  mg_access_log_write(&e);
  mg_access_log_flush();
  close_access_log();
  restore_stdout(saved);
  mg_log_open(NULL, MG_LOG_INFO);
  MG_CHECK_INT(rc, 0);
  read_file(err_path);
  unlink(err_path);
  char *first = strstr(file_buf, "[error]");
  MG_CHECK(first != NULL);
  MG_CHECK(strstr(first, "access log: write failed, lines lost: Broken pipe\n") != NULL);
  MG_CHECK(strstr(first + 1, "[error]") == NULL); /* once, not once per flush */
}

static void test_access_huge_line(void) {
  const char *path = temp_file();
  MG_CHECK_INT(mg_access_log_open(&loop, path, NULL, 0), 0);
  size_t ua_len = 200 * 1024;
  char *ua = malloc(ua_len);
  MG_CHECK(ua != NULL);
  memset(ua, '"', ua_len); /* each one doubles when escaped */
  mg_access_entry_t e = full_entry();
  e.user_agent = ua;
  e.user_agent_len = ua_len;
  mg_access_log_write(&e); /* larger than the buffer: written at once */
  free(ua);
  size_t len = read_file(path);
  MG_CHECK(len > 2 * ua_len);
  mg_access_entry_t small = full_entry();
  mg_access_log_write(&small); /* the buffer starts again at its normal size */
  close_access_log();
  MG_CHECK(read_file(path) > len);
  check_json_lines();
  unlink(path);
}

int main(void) {
  umask(022);
  signal(SIGPIPE, SIG_IGN);
  uv_loop_init(&loop);
  MG_RUN(test_level_parse);
  MG_RUN(test_error_log_format_and_filter);
  MG_RUN(test_error_log_long_message);
  MG_RUN(test_error_log_open_errors);
  MG_RUN(test_access_full_line);
  MG_RUN(test_access_null_fields);
  MG_RUN(test_access_escaping);
  MG_RUN(test_access_redaction);
  MG_RUN(test_access_flush_by_timer);
  MG_RUN(test_access_flush_at_32k);
  MG_RUN(test_access_stdout);
  MG_RUN(test_access_off_and_errors);
  MG_RUN(test_access_pipe_keeps_lines_whole);
  MG_RUN(test_access_write_error_reported_once);
  MG_RUN(test_access_huge_line);
  close_access_log();
  uv_run(&loop, UV_RUN_DEFAULT);
  if (uv_loop_close(&loop) != 0) {
    fprintf(stderr, "  FAIL the loop still has handles open\n");
    mg_test_failed++;
  }
  return mg_test_summary();
}
