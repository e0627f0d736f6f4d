/* mg_http: HTTP vocabulary shared by the server and proxy sides (see mg_http.h). */
#include "mg_http.h"

#include <string.h>
#include <time.h>

static const struct { int status; const char *msg; } errors[] = {
  {0, "ok"},
#define MG_HTTP_ERR_ROW(name, status, msg) {status, msg},
  MG_HTTP_ERRORS(MG_HTTP_ERR_ROW)
#undef MG_HTTP_ERR_ROW
};

int mg_http_error_status(mg_http_error_t e) {
  return (e > 0 && e < MG_HTTP_E_MAX) ? errors[e].status : 500;
}

const char *mg_http_error_message(mg_http_error_t e) {
  return (e > 0 && e < MG_HTTP_E_MAX) ? errors[e].msg : "internal error";
}

const char *mg_http_reason(int status) {
  switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 103: return "Early Hints";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 203: return "Non-Authoritative Information";
    case 204: return "No Content";
    case 205: return "Reset Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Content";
    case 426: return "Upgrade Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Unknown";
  }
}

int mg_http_ieq(const char *a, size_t alen, const char *b) {
  size_t i = 0;
  for (; i < alen; i++) {
    unsigned char c = (unsigned char)a[i];
    if (c >= 'A' && c <= 'Z') c = (unsigned char)(c + 32);
    if (b[i] == '\0' || c != (unsigned char)b[i]) return 0;
  }
  return b[i] == '\0';
}



/* Case-insensitive equality of two byte strings of length N. */
static int ieq_ci(const char *a, const char *b, size_t n) {
  for (size_t i = 0; i < n; i++) {
    unsigned char x = (unsigned char)a[i], y = (unsigned char)b[i];
    if (x >= 'A' && x <= 'Z') x = (unsigned char)(x + 32);
    if (y >= 'A' && y <= 'Z') y = (unsigned char)(y + 32);
    if (x != y) return 0;
  }
  return 1;
}

mg_header_id_t mg_http_header_id(const char *n, size_t len) {
  switch (len) {
    case 2: return mg_http_ieq(n, len, "te") ? MG_HDR_TE : MG_HDR_OTHER;
    case 4: return mg_http_ieq(n, len, "host") ? MG_HDR_HOST : MG_HDR_OTHER;
    case 6:
      if (mg_http_ieq(n, len, "expect")) return MG_HDR_EXPECT;
      return mg_http_ieq(n, len, "cookie") ? MG_HDR_COOKIE : MG_HDR_OTHER;
    case 7:
      if (mg_http_ieq(n, len, "trailer")) return MG_HDR_TRAILER;
      return mg_http_ieq(n, len, "upgrade") ? MG_HDR_UPGRADE : MG_HDR_OTHER;
    case 10:
      if (mg_http_ieq(n, len, "connection")) return MG_HDR_CONNECTION;
      if (mg_http_ieq(n, len, "keep-alive")) return MG_HDR_KEEP_ALIVE;
      return mg_http_ieq(n, len, "user-agent") ? MG_HDR_USER_AGENT : MG_HDR_OTHER;
    case 12: return mg_http_ieq(n, len, "x-request-id") ? MG_HDR_X_REQUEST_ID : MG_HDR_OTHER;
    case 13: return mg_http_ieq(n, len, "authorization") ? MG_HDR_AUTHORIZATION : MG_HDR_OTHER;
    case 14: return mg_http_ieq(n, len, "content-length") ? MG_HDR_CONTENT_LENGTH : MG_HDR_OTHER;
    case 15: return mg_http_ieq(n, len, "x-forwarded-for") ? MG_HDR_X_FORWARDED_FOR : MG_HDR_OTHER;
    case 16:
      if (mg_http_ieq(n, len, "proxy-connection")) return MG_HDR_PROXY_CONNECTION;
      return mg_http_ieq(n, len, "x-forwarded-host") ? MG_HDR_X_FORWARDED_HOST : MG_HDR_OTHER;
    case 17:
      if (mg_http_ieq(n, len, "transfer-encoding")) return MG_HDR_TRANSFER_ENCODING;
      return mg_http_ieq(n, len, "x-forwarded-proto") ? MG_HDR_X_FORWARDED_PROTO : MG_HDR_OTHER;
    case 19:
      return mg_http_ieq(n, len, "proxy-authorization") ? MG_HDR_PROXY_AUTHORIZATION
                                                         : MG_HDR_OTHER;
    default: return MG_HDR_OTHER;
  }
}

int mg_http_connection_names_fields(const char *v, size_t len) {
  const char *item;
  size_t il;
  while (mg_http_list_next(&v, &len, &item, &il))
    if (!mg_http_ieq(item, il, "close") && !mg_http_ieq(item, il, "keep-alive") &&
        !mg_http_ieq(item, il, "upgrade"))
      return 1;
  return 0;
}

int mg_http_connection_lists(const char *v, size_t len, const char *name, size_t name_len) {
  const char *item;
  size_t il;
  while (mg_http_list_next(&v, &len, &item, &il))
    if (il == name_len && ieq_ci(item, name, il)) return 1;
  return 0;
}

int mg_http_is_token(const char *s, size_t len) {
  if (len == 0) return 0;
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) continue;
    if (!strchr("!#$%&'*+-.^_`|~", c) || c == 0) return 0;
  }
  return 1;
}

void mg_http_trim(const char **s, size_t *len) {
  while (*len && (**s == ' ' || **s == '\t')) { (*s)++; (*len)--; }
  while (*len && ((*s)[*len - 1] == ' ' || (*s)[*len - 1] == '\t')) (*len)--;
}

int mg_http_list_next(const char **s, size_t *len, const char **item, size_t *item_len) {
  while (*len) {
    const char *p = memchr(*s, ',', *len);
    size_t n = p ? (size_t)(p - *s) : *len;
    *item = *s;
    *item_len = n;
    *s += p ? n + 1 : n;
    *len -= p ? n + 1 : n;
    mg_http_trim(item, item_len);
    if (*item_len) return 1;
  }
  return 0;
}

double mg_http_wall_time(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int mg_http_ieq_n(const char *a, size_t alen, const char *b, size_t blen) {
  if (alen != blen) return 0;
  for (size_t i = 0; i < alen; i++) {
    unsigned char x = (unsigned char)a[i], y = (unsigned char)b[i];
    if (x >= 'A' && x <= 'Z') x = (unsigned char)(x + 32);
    if (y >= 'A' && y <= 'Z') y = (unsigned char)(y + 32);
    if (x != y) return 0;
  }
  return 1;
}
