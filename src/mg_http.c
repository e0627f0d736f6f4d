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

int mg_http_is_hop_by_hop(const char *name, size_t len) {
  switch (len) {
    case 2: return mg_http_ieq(name, len, "te");
    case 7: return mg_http_ieq(name, len, "trailer") || mg_http_ieq(name, len, "upgrade");
    case 10: return mg_http_ieq(name, len, "connection") || mg_http_ieq(name, len, "keep-alive");
    case 16: return mg_http_ieq(name, len, "proxy-connection");
    case 17: return mg_http_ieq(name, len, "transfer-encoding");
    default: return 0;
  }
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
