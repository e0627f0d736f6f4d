/* mg_path: normalises a request path before routing, so that a path that looks different
 * cannot reach a route the plain path would not (`/public/../admin`, `//admin`, `/%61dmin`). */
#ifndef MG_PATH_H
#define MG_PATH_H

#include <stddef.h>

/* Normalises the path part of a request target (no query, no fragment) of LEN bytes into OUT,
 * which must hold at least LEN + 1 bytes; writes a NUL-terminated result and its length.
 * Rules: must start with '/'; repeated slashes collapse to one; "." and ".." segments are
 * resolved (a ".." above the root is an error); %XX of unreserved characters (ALPHA DIGIT
 * - . _ ~) is decoded, every other %XX is kept with upper-case hex digits; %2F and
 * backslashes are never decoded or treated as separators; malformed %-escapes, NUL and
 * control bytes (0x00-0x1F, 0x7F), raw or %-encoded, are errors. Dot segments are resolved
 * after decoding (`/x/%2e%2e/y` is `/y`); a trailing slash is kept, and a trailing dot
 * segment leaves one (`/a/b/..` is `/a/`), as in RFC 3986. Other bytes, including those
 * above 0x7F, are copied as they are. The result is never longer than LEN, and normalising
 * it again gives the same bytes.
 * Returns 0, or -1 when the path is invalid (the caller answers 400). */
int mg_path_normalize(const char *in, size_t len, char *out, size_t *outlen);

#endif
