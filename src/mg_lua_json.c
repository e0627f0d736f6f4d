/* mg_lua_json: `mg.json` on yajl (see mg_lua_json.h for the mapping between Lua and JSON).
 *
 * Encoding walks the Lua value with raw access and feeds yajl_gen, whose print callback
 * appends to an mg_buf, so C callers get JSON text without a Lua string in between. Strings
 * are checked for UTF-8 here rather than by yajl_gen_validate_utf8, because the error must
 * say where the bad byte is. Decoding runs yajl's callback parser and builds the Lua value on
 * the Lua stack as the events arrive: no intermediate tree.
 *
 * A Lua allocation can raise "not enough memory" at any point (the worker caps each VM's
 * memory), which would longjmp past our free() calls. So the yajl handles and the output
 * buffer of the Lua-facing functions live in a small userdata with a __gc that frees them:
 * an error raised halfway leaks nothing. */
#include "mg_lua_json.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <yajl/yajl_gen.h>
#include <yajl/yajl_parse.h>

/* Registry keys and the null sentinel: the addresses are what matter, never the contents. */
static const char array_mt_key;
static const char guard_mt_key;
static const char raw_mt_key;
static const char bigint_mt_key;
static const char null_sentinel;

/* 2^53: every integer up to here is exact as a double, so it can print as an integer. */
#define MAX_EXACT_INT 9007199254740992.0

/* Enough Lua stack for the deepest walk: at most two slots (key and value) per level. */
#define STACK_NEED (2 * (MAX_JSON_LEVELS) + 8)
#define MAX_JSON_LEVELS (MG_JSON_MAX_DEPTH + 1)

/* ------------------------------------------------------------------------------------------
 * Shared pieces
 * ---------------------------------------------------------------------------------------- */

/* What a Lua-facing call holds outside Lua's heap; freed by hand on the normal path and by
 * __gc if an error unwinds past us. */
typedef struct json_guard {
  yajl_gen gen;
  yajl_handle parser;
  mg_buf_t buf;
} json_guard_t;

static int on_guard_gc(lua_State *L) {
  json_guard_t *g = lua_touserdata(L, 1);
  if (g->gen) yajl_gen_free(g->gen);
  if (g->parser) yajl_free(g->parser);
  mg_buf_dispose(&g->buf);
  g->gen = NULL;
  g->parser = NULL;
  return 0;
}

static json_guard_t *push_guard(lua_State *L) {
  json_guard_t *g = lua_newuserdata(L, sizeof *g);
  g->gen = NULL;
  g->parser = NULL;
  mg_buf_init(&g->buf);
  lua_pushlightuserdata(L, (void *)&guard_mt_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  lua_setmetatable(L, -2);
  return g;
}

/* Pushes the array metatable, creating it in the registry the first time. */
static void push_array_mt(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&array_mt_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (!lua_isnil(L, -1)) return;
  lua_pop(L, 1);
  lua_createtable(L, 0, 1);
  lua_pushliteral(L, "array");
  lua_setfield(L, -2, "__jsontype");
  lua_pushlightuserdata(L, (void *)&array_mt_key);
  lua_pushvalue(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

void mg_json_push_null(lua_State *L) { lua_pushlightuserdata(L, (void *)&null_sentinel); }

static int is_null(lua_State *L, int idx) {
  return lua_type(L, idx) == LUA_TLIGHTUSERDATA && lua_touserdata(L, idx) == &null_sentinel;
}

/* Returns the offset of the first byte that does not start a well-formed UTF-8 sequence
 * (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF), or LEN when all is
 * well. */
static size_t utf8_check(const unsigned char *s, size_t len) {
  size_t i = 0;
  while (i < len) {
    unsigned c = s[i];
    if (c < 0x80) {
      i++;
      /* ASCII runs, eight bytes at a time. */
      while (len - i >= 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        if (w & 0x8080808080808080ull) break;
        i += 8;
      }
      continue;
    }
    size_t need;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      need = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      need = 2;
      if (c == 0xE0) lo = 0xA0; /* overlong */
      if (c == 0xED) hi = 0x9F; /* surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
      need = 3;
      if (c == 0xF0) lo = 0x90; /* overlong */
      if (c == 0xF4) hi = 0x8F; /* above U+10FFFF */
    } else {
      return i;
    }
    if (len - i <= need) return i;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (size_t k = 2; k <= need; k++)
      if ((s[i + k] & 0xC0) != 0x80) return i;
    i += need + 1;
  }
  return len;
}

/* Writes the shortest "%.Ng" form of D that reads back as D (15 digits suffice for most
 * values, 17 always do). Returns the length. */
static int format_double(char *buf, size_t size, double d) {
  int len = 0;
  for (int prec = 15; prec <= 17; prec++) {
    len = snprintf(buf, size, "%.*g", prec, d);
    if (prec == 17 || strtod(buf, NULL) == d) break;
  }
  return len;
}

/* ------------------------------------------------------------------------------------------
 * Encoding
 * ---------------------------------------------------------------------------------------- */

typedef struct encoder {
  lua_State *L;
  yajl_gen gen;
  mg_buf_t *out;
  int oom;
  int array_mt; /* stack index of the array metatable (nil when none exists yet) */
  int depth;
  const void *open[MAX_JSON_LEVELS]; /* the tables being encoded, outermost first */
  const void *text_mt[2];            /* the bigint and raw metatables, looked up at the first
                                        userdata (encoder_text) */
  int text_mt_known;
  char *err;
  size_t errlen;
} encoder_t;

static void on_print(void *ctx, const char *s, size_t len) {
  encoder_t *e = ctx;
  if (!e->oom && mg_buf_append(e->out, s, len) != 0) e->oom = 1;
}

static int fail(encoder_t *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(encoder_t *e, const char *fmt, ...) {
  if (e->errlen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->err, e->errlen, fmt, ap);
    va_end(ap);
  }
  return -1;
}

static int gen_ok(encoder_t *e, yajl_gen_status st) {
  return st == yajl_gen_status_ok ? 0 : fail(e, "json generator error %d", (int)st);
}

static int encode_string(encoder_t *e, int idx) {
  size_t len;
  const char *s = lua_tolstring(e->L, idx, &len);
  size_t bad = utf8_check((const unsigned char *)s, len);
  if (bad != len) return fail(e, "invalid UTF-8 at byte %zu", bad + 1);
  return gen_ok(e, yajl_gen_string(e->gen, (const unsigned char *)s, len));
}

static int encode_number(encoder_t *e, double d) {
  char buf[40];
  int len;
  if (isnan(d)) return fail(e, "cannot encode NaN");
  if (isinf(d)) return fail(e, "cannot encode Inf");
  if (d == floor(d) && fabs(d) <= MAX_EXACT_INT) {   /* the common case, without printf */
    long long v = (long long)d;
    unsigned long long u = v < 0 ? 0ull - (unsigned long long)v : (unsigned long long)v;
    char tmp[24];
    int n = 0;
    do tmp[n++] = (char)('0' + u % 10); while ((u /= 10) != 0);
    len = 0;
    if (v < 0) buf[len++] = '-';
    while (n) buf[len++] = tmp[--n];
    buf[len] = '\0';
  } else
    len = format_double(buf, sizeof buf, d);
  return gen_ok(e, yajl_gen_number(e->gen, buf, (size_t)len));
}

static int encode_value(encoder_t *e, int idx);

/* Decides how the table at T encodes: returns N > 0 for an array of N elements (its keys are
 * exactly 1..N), 0 for an object, -1 for an empty table marked as an array. */
static long long classify(encoder_t *e, int t) {
  lua_State *L = e->L;
  long long count = 0;
  double max = 0;
  lua_pushnil(L);
  while (lua_next(L, t)) {
    lua_pop(L, 1);
    double k;
    if (lua_type(L, -1) != LUA_TNUMBER || (k = lua_tonumber(L, -1)) < 1 || k != floor(k) ||
        k > MAX_EXACT_INT) {
      lua_pop(L, 1);
      return 0;
    }
    count++;
    if (k > max) max = k;
  }
  if (count > 0) return (double)count == max ? count : 0;
  if (lua_getmetatable(L, t)) {
    int marked = lua_rawequal(L, -1, e->array_mt);
    lua_pop(L, 1);
    if (marked) return -1;
  }
  return 0;
}

static int encode_table(encoder_t *e, int t) {
  lua_State *L = e->L;
  const void *self = lua_topointer(L, t);
  for (int i = 0; i < e->depth; i++)
    if (e->open[i] == self) return fail(e, "cannot encode a table that contains itself");
  if (e->depth == MG_JSON_MAX_DEPTH) return fail(e, "nesting deeper than %d", MG_JSON_MAX_DEPTH);
  e->open[e->depth++] = self;

  long long n = classify(e, t);
  if (n != 0) {
    if (gen_ok(e, yajl_gen_array_open(e->gen))) return -1;
    for (long long i = 1; i <= n; i++) {
      lua_rawgeti(L, t, (int)i);
      if (encode_value(e, lua_gettop(L))) return -1;
      lua_pop(L, 1);
    }
    if (gen_ok(e, yajl_gen_array_close(e->gen))) return -1;
  } else {
    if (gen_ok(e, yajl_gen_map_open(e->gen))) return -1;
    lua_pushnil(L);
    while (lua_next(L, t)) {
      if (lua_type(L, -2) != LUA_TSTRING) return fail(e, "object key must be a string");
      if (encode_string(e, -2) || encode_value(e, lua_gettop(L))) return -1;
      lua_pop(L, 1);
    }
    if (gen_ok(e, yajl_gen_map_close(e->gen))) return -1;
  }
  e->depth--;
  return 0;
}

static int is_bigint(lua_State *L, int idx, const char **s, size_t *len);
static int is_raw(lua_State *L, int idx, const char **s, size_t *len);

/* The registry's value under KEY, as a pointer (NULL when there is none). */
static const void *registry_pointer(lua_State *L, const void *key) {
  lua_pushlightuserdata(L, (void *)key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  const void *p = lua_topointer(L, -1);
  lua_pop(L, 1);
  return p;
}

/* Whether the value at IDX is a userdata whose metatable is MT_A or MT_B (NULL matches
 * nothing); if so sets *S and *LEN to the bytes it holds. */
static int udata_text(lua_State *L, int idx, const void *mt_a, const void *mt_b,
                      const char **s, size_t *len) {
  if (lua_type(L, idx) != LUA_TUSERDATA || !lua_getmetatable(L, idx)) return 0;
  const void *mt = lua_topointer(L, -1);
  lua_pop(L, 1);
  if (mt == NULL || (mt != mt_a && mt != mt_b)) return 0;
  *s = lua_touserdata(L, idx);
  *len = lua_objlen(L, idx);
  return 1;
}

/* Whether the userdata at IDX is a bigint or a raw value; if so sets *S and *LEN to its
 * text. Like is_bigint and is_raw, with the two metatables looked up once per encode. */
static int encoder_text(encoder_t *e, int idx, const char **s, size_t *len) {
  if (!e->text_mt_known) {
    e->text_mt[0] = registry_pointer(e->L, &bigint_mt_key);
    e->text_mt[1] = registry_pointer(e->L, &raw_mt_key);
    e->text_mt_known = 1;
  }
  return udata_text(e->L, idx, e->text_mt[0], e->text_mt[1], s, len);
}

/* IDX is absolute. On failure the stack may hold leftovers; the caller resets it. */
static int encode_value(encoder_t *e, int idx) {
  lua_State *L = e->L;
  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    return gen_ok(e, yajl_gen_null(e->gen));
  case LUA_TBOOLEAN:
    return gen_ok(e, yajl_gen_bool(e->gen, lua_toboolean(L, idx)));
  case LUA_TNUMBER:
    return encode_number(e, lua_tonumber(L, idx));
  case LUA_TSTRING:
    return encode_string(e, idx);
  case LUA_TTABLE:
    return encode_table(e, idx);
  case LUA_TLIGHTUSERDATA:
    if (is_null(L, idx)) return gen_ok(e, yajl_gen_null(e->gen));
    return fail(e, "cannot encode %s", luaL_typename(L, idx));
  case LUA_TUSERDATA: {
    const char *s;
    size_t len;
    /* yajl_gen_number writes its text as it is, with the separator the position needs:
     * what both a bigint's digits and a raw value's checked JSON text want. */
    if (encoder_text(e, idx, &s, &len)) return gen_ok(e, yajl_gen_number(e->gen, s, len));
  }
  /* fall through */
  default:
    return fail(e, "cannot encode %s", luaL_typename(L, idx));
  }
}

int mg_json_encode_value(lua_State *L, int idx, mg_buf_t *out, char *err, size_t errlen) {
  if (errlen) err[0] = '\0';
  if (idx < 0 && idx > LUA_REGISTRYINDEX) idx = lua_gettop(L) + idx + 1;
  int base = lua_gettop(L);
  size_t old_len = out->len;
  encoder_t e = {.L = L, .out = out, .err = err, .errlen = errlen};

  /* Everything that can raise (stack growth, the registry lookup) happens before the
   * generator is allocated, so an out-of-memory error here leaks nothing. */
  if (!lua_checkstack(L, STACK_NEED)) return fail(&e, "stack overflow");
  push_array_mt(L);
  e.array_mt = lua_gettop(L);
  e.gen = yajl_gen_alloc(NULL);
  if (!e.gen) {
    lua_settop(L, base);
    return fail(&e, "out of memory");
  }
  yajl_gen_config(e.gen, yajl_gen_print_callback, on_print, &e);

  int rc = encode_value(&e, idx);
  if (rc == 0 && e.oom) rc = fail(&e, "out of memory");
  yajl_gen_free(e.gen);
  lua_settop(L, base);
  if (rc != 0) out->len = old_len;
  return rc;
}

/* json.encode(value) -> string; raises on values JSON cannot hold. */
static int l_encode(lua_State *L) {
  char err[128];
  lua_settop(L, 1);
  json_guard_t *g = push_guard(L);
  if (mg_json_encode_value(L, 1, &g->buf, err, sizeof err) != 0) {
    mg_buf_dispose(&g->buf);
    return luaL_error(L, "%s", err);
  }
  lua_pushlstring(L, g->buf.data, g->buf.len);
  mg_buf_dispose(&g->buf);
  return 1;
}

/* ------------------------------------------------------------------------------------------
 * Decoding
 * ---------------------------------------------------------------------------------------- */

/* The value being built sits on the Lua stack. Each open container has a slot (a nil until
 * its table is made) followed by its items as they arrive: values for an array, key and
 * value pairs for an object. The table is made when the container closes, or when
 * DECODE_BATCH items are waiting, with room for all of them, and they move in at once: a
 * table is allocated once at its final size instead of growing 1, 2, 4, 8... as keys come.
 * The batch also bounds the stack: MAX_JSON_LEVELS * (2 * DECODE_BATCH + 4) slots at most,
 * below LuaJIT's limit of 8000 for one C call. */
#define DECODE_BATCH 32

typedef struct level {
  int slot;     /* stack index of the container's table (nil until made) */
  int is_array;
  int made;     /* the table exists */
  int count;    /* array items already in the table */
} level_t;

typedef struct decoder {
  lua_State *L;
  int array_mt;
  int depth;
  const char *abort; /* why a callback stopped the parse, or NULL */
  level_t lv[MAX_JSON_LEVELS];
} decoder_t;

/* Moves the items waiting above L's slot into its table, making the table first. */
static void flush_level(decoder_t *d, level_t *l) {
  lua_State *L = d->L;
  int n = lua_gettop(L) - l->slot;
  if (!l->made) {
    if (l->is_array) {
      lua_createtable(L, n, 0);
      lua_pushvalue(L, d->array_mt);
      lua_setmetatable(L, -2);
    } else {
      lua_createtable(L, 0, n / 2);
    }
    lua_replace(L, l->slot);
    l->made = 1;
  }
  if (l->is_array) {
    for (int i = 1; i <= n; i++) {
      lua_pushvalue(L, l->slot + i);
      lua_rawseti(L, l->slot, ++l->count);
    }
  } else {
    for (int i = 1; i < n; i += 2) {   /* in order, so that a repeated key's last value wins */
      lua_pushvalue(L, l->slot + i);
      lua_pushvalue(L, l->slot + i + 1);
      lua_rawset(L, l->slot);
    }
  }
  lua_settop(L, l->slot);
}

/* A value was pushed: it waits above its container's slot (or is the whole document). */
static int add_value(decoder_t *d) {
  if (d->depth == 0) return 1;
  level_t *l = &d->lv[d->depth - 1];
  int waiting = lua_gettop(d->L) - l->slot;
  if (waiting >= (l->is_array ? DECODE_BATCH : 2 * DECODE_BATCH)) flush_level(d, l);
  return 1;
}

static int on_null(void *ctx) {
  decoder_t *d = ctx;
  mg_json_push_null(d->L);
  return add_value(d);
}

static int on_boolean(void *ctx, int b) {
  decoder_t *d = ctx;
  lua_pushboolean(d->L, b);
  return add_value(d);
}

/* ---- big integers ---------------------------------------------------------------------
 * An integer beyond +-2^53 cannot be held exactly by a Lua number, and a gateway that
 * merges documents must not change an id on the way. Such integers decode to a "bigint": a
 * userdata holding the digits, which encodes back unchanged; tostring gives the digits,
 * == compares them, tonumber(tostring(b)) gives the nearest double. */

static int bigint_tostring(lua_State *L) {
  size_t n = lua_objlen(L, 1);
  lua_pushlstring(L, lua_touserdata(L, 1), n);
  return 1;
}

static int bigint_eq(lua_State *L) {
  size_t a = lua_objlen(L, 1), b = lua_objlen(L, 2);
  lua_pushboolean(L, a == b && memcmp(lua_touserdata(L, 1), lua_touserdata(L, 2), a) == 0);
  return 1;
}

/* __concat of bigints and raw values: each operand that is one stands for its text. */
static int text_concat(lua_State *L) {
  for (int i = 1; i <= 2; i++) {
    const char *s;
    size_t n;
    if (is_bigint(L, i, &s, &n) || is_raw(L, i, &s, &n)) {
      lua_pushlstring(L, s, n);
      lua_replace(L, i);
    } else if (lua_type(L, i) != LUA_TSTRING && lua_type(L, i) != LUA_TNUMBER) {
      return luaL_error(L, "attempt to concatenate a %s value", luaL_typename(L, i));
    }
  }
  lua_concat(L, 2);
  return 1;
}

static void push_bigint_mt(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&bigint_mt_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (!lua_isnil(L, -1)) return;
  lua_pop(L, 1);
  lua_createtable(L, 0, 4);
  lua_pushcfunction(L, bigint_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushcfunction(L, bigint_eq);
  lua_setfield(L, -2, "__eq");
  lua_pushcfunction(L, text_concat);
  lua_setfield(L, -2, "__concat");
  lua_pushliteral(L, "bigint");
  lua_setfield(L, -2, "__metatable");
  lua_pushlightuserdata(L, (void *)&bigint_mt_key);
  lua_pushvalue(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

/* Whether the value at IDX is a userdata whose metatable is the registry's value under
 * MT_KEY (a bigint, a raw value); if so sets *S and *LEN to the bytes it holds. */
static int text_udata(lua_State *L, int idx, const void *mt_key, const char **s, size_t *len) {
  return lua_type(L, idx) == LUA_TUSERDATA &&
         udata_text(L, idx, registry_pointer(L, mt_key), NULL, s, len);
}

/* Whether the value at IDX is a bigint; if so sets *S and *LEN to its digits. */
static int is_bigint(lua_State *L, int idx, const char **s, size_t *len) {
  return text_udata(L, idx, &bigint_mt_key, s, len);
}

static int plain_integer(const char *s, size_t len) {
  for (size_t i = 0; i < len; i++)
    if (s[i] == '.' || s[i] == 'e' || s[i] == 'E') return 0;
  return 1;
}

/* Reads yajl's number text S into *V. Returns NULL, or why the number is refused: one with
 * a fraction or an exponent that does not fit a double (an integer of any length is fine:
 * decode keeps long ones as bigints). */
static const char *read_number(const char *s, size_t len, double *v) {
  char small[64];
  char *buf = len < sizeof small ? small : malloc(len + 1);
  if (!buf) return "out of memory";
  memcpy(buf, s, len);
  buf[len] = '\0';
  *v = strtod(buf, NULL);
  if (buf != small) free(buf);
  return isinf(*v) && !plain_integer(s, len) ? "number out of range" : NULL;
}

static int on_number(void *ctx, const char *s, size_t len) {
  decoder_t *d = ctx;
  /* The common case, an integer of at most 15 digits (exact in a double), without strtod. */
  size_t neg = len > 0 && s[0] == '-';
  if (len - neg >= 1 && len - neg <= 15) {
    long long v = 0;
    size_t i = neg;
    while (i < len && s[i] >= '0' && s[i] <= '9') v = v * 10 + (s[i++] - '0');
    if (i == len) {
      lua_pushnumber(d->L, neg ? -(double)v : (double)v);
      return add_value(d);
    }
  }
  double v;
  if ((d->abort = read_number(s, len, &v)) != NULL) return 0;
  /* 2^53 itself is exact; 2^53 + 1 also reads as 2^53, so compare the digits there. */
  const char *digits_only = s[0] == '-' ? s + 1 : s;
  size_t dlen = s[0] == '-' ? len - 1 : len;
  int exact = fabs(v) < MAX_EXACT_INT ||
              (dlen == 16 && memcmp(digits_only, "9007199254740992", 16) == 0);
  if (!exact && plain_integer(s, len)) {
    char *digits = lua_newuserdata(d->L, len);
    memcpy(digits, s, len);
    push_bigint_mt(d->L);
    lua_setmetatable(d->L, -2);
    return add_value(d);
  }
  lua_pushnumber(d->L, v);
  return add_value(d);
}

static int on_string(void *ctx, const unsigned char *s, size_t len) {
  decoder_t *d = ctx;
  lua_pushlstring(d->L, (const char *)s, len);
  return add_value(d);
}

static int open_container(decoder_t *d, int is_array) {
  if (d->depth == MG_JSON_MAX_DEPTH) {
    d->abort = "nesting deeper than 100";
    return 0;
  }
  if (!lua_checkstack(d->L, 2 * DECODE_BATCH + 4)) {
    d->abort = "stack overflow";
    return 0;
  }
  lua_pushnil(d->L);
  d->lv[d->depth] = (level_t){.slot = lua_gettop(d->L), .is_array = is_array};
  d->depth++;
  return 1;
}

static int close_container(decoder_t *d) {
  flush_level(d, &d->lv[d->depth - 1]);
  d->depth--;
  return add_value(d);
}

static int on_start_map(void *ctx) { return open_container(ctx, 0); }
static int on_start_array(void *ctx) { return open_container(ctx, 1); }
static int on_end(void *ctx) { return close_container(ctx); }

static int on_map_key(void *ctx, const unsigned char *s, size_t len) {
  decoder_t *d = ctx;
  lua_pushlstring(d->L, (const char *)s, len);
  return 1;
}

static const yajl_callbacks decode_callbacks = {
  .yajl_null = on_null,
  .yajl_boolean = on_boolean,
  .yajl_number = on_number,
  .yajl_string = on_string,
  .yajl_start_map = on_start_map,
  .yajl_map_key = on_map_key,
  .yajl_end_map = on_end,
  .yajl_start_array = on_start_array,
  .yajl_end_array = on_end,
};

/* Writes "parse error at byte POS: MSG" into OUT: MSG is WHY when a callback stopped the
 * parse, else yajl's message without its "parse error: " or "lexical error: " prefix and
 * trailing newline. Raises nothing, so callers may hold a yajl handle across it. */
static void format_parse_error(yajl_handle h, const char *text, size_t len, size_t pos,
                               const char *why, char *out, size_t size) {
  if (why) {
    snprintf(out, size, "parse error at byte %zu: %s", pos, why);
    return;
  }
  unsigned char *raw = yajl_get_error(h, 0, (const unsigned char *)text, len);
  const char *msg = raw ? (const char *)raw : "invalid JSON";
  const char *colon = strstr(msg, "error: ");
  if (colon) msg = colon + 7;
  int mlen = (int)strlen(msg);
  while (mlen && (msg[mlen - 1] == '\n' || msg[mlen - 1] == ' ')) mlen--;
  snprintf(out, size, "parse error at byte %zu: %.*s", pos, mlen, msg);
  if (raw) yajl_free_error(h, raw);
}

/* json.decode(text) -> value, or nil, "parse error at byte N: ..." for text that is not JSON.
 * N counts the bytes the parser had read when it stopped (the input length when the text
 * ended too early). */
static int l_decode(lua_State *L) {
  size_t len;
  const char *text;
  if (!is_raw(L, 1, &text, &len)) text = luaL_checklstring(L, 1, &len);
  lua_settop(L, 1);
  if (!lua_checkstack(L, STACK_NEED)) return luaL_error(L, "stack overflow");
  push_array_mt(L);
  json_guard_t *g = push_guard(L);
  int base = lua_gettop(L);

  decoder_t d = {.L = L, .array_mt = 2};
  g->parser = yajl_alloc(&decode_callbacks, NULL, &d);
  if (!g->parser) return luaL_error(L, "out of memory");

  size_t pos = 0;
  yajl_status st = yajl_parse(g->parser, (const unsigned char *)text, len);
  if (st != yajl_status_ok) {
    pos = yajl_get_bytes_consumed(g->parser);
  } else {
    st = yajl_complete_parse(g->parser);
    pos = len;
  }
  if (st == yajl_status_ok) {
    yajl_free(g->parser);
    g->parser = NULL;
    return 1;
  }
  char msg[200];
  format_parse_error(g->parser, text, len, pos, d.abort, msg, sizeof msg);
  yajl_free(g->parser);
  g->parser = NULL;
  lua_settop(L, base);
  lua_pushnil(L);
  lua_pushstring(L, msg);
  return 2;
}

/* ------------------------------------------------------------------------------------------
 * Raw JSON
 *
 * json.raw(text) checks that TEXT is one JSON document that decode would accept (the same
 * parser and limits: nesting, numbers, UTF-8) and returns a value that encode writes as that
 * text, unchanged, wherever it sits (less the whitespace around it; yajl also skips \v and \f
 * between tokens, which JSON does not allow, so those become spaces). An aggregation endpoint that passes a backend's document
 * through so skips building Lua tables only to write them out again; the text is checked
 * anyway, so the answer is JSON whatever the backend sent.
 * ---------------------------------------------------------------------------------------- */

typedef struct checker {
  int depth;
  const char *abort;
} checker_t;

static int check_open(void *ctx) {
  checker_t *c = ctx;
  if (c->depth == MG_JSON_MAX_DEPTH) {
    c->abort = "nesting deeper than 100";
    return 0;
  }
  c->depth++;
  return 1;
}

static int check_close(void *ctx) {
  ((checker_t *)ctx)->depth--;
  return 1;
}

/* Refuses what decode refuses (read_number), without strtod for the common numbers. */
static int check_number(void *ctx, const char *s, size_t len) {
  if (plain_integer(s, len)) return 1;
  int has_exp = 0;
  for (size_t i = 0; i < len; i++)
    if (s[i] == 'e' || s[i] == 'E') has_exp = 1;
  if (!has_exp && len < 300) return 1; /* at most 299 digits: below DBL_MAX (~1.8e308) */
  double v;
  return (((checker_t *)ctx)->abort = read_number(s, len, &v)) == NULL;
}

static const yajl_callbacks check_callbacks = {
  .yajl_number = check_number,
  .yajl_start_map = check_open,
  .yajl_end_map = check_close,
  .yajl_start_array = check_open,
  .yajl_end_array = check_close,
};

static int raw_tostring(lua_State *L) {
  lua_pushlstring(L, lua_touserdata(L, 1), lua_objlen(L, 1));
  return 1;
}

static void push_raw_mt(lua_State *L) {
  lua_pushlightuserdata(L, (void *)&raw_mt_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (!lua_isnil(L, -1)) return;
  lua_pop(L, 1);
  lua_createtable(L, 0, 3);
  lua_pushcfunction(L, raw_tostring);
  lua_setfield(L, -2, "__tostring");
  lua_pushcfunction(L, text_concat);
  lua_setfield(L, -2, "__concat");
  lua_pushliteral(L, "raw json");
  lua_setfield(L, -2, "__metatable");
  lua_pushlightuserdata(L, (void *)&raw_mt_key);
  lua_pushvalue(L, -2);
  lua_rawset(L, LUA_REGISTRYINDEX);
}

/* Whether the value at IDX is a raw JSON value; if so sets *S and *LEN to its text. */
static int is_raw(lua_State *L, int idx, const char **s, size_t *len) {
  return text_udata(L, idx, &raw_mt_key, s, len);
}

/* The bytes yajl's lexer skips between tokens: JSON's four, and also \v and \f, which JSON
 * does not have (a raw value's text turns those into spaces). */
static int is_yajl_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* The memory of the checking parser. One parser lives at a time (mg_json_push_raw frees it
 * before it returns, and nothing in between can start another), so its blocks come from a
 * static arena, reset for each parser: a check makes no malloc call unless a long escaped
 * string outgrows the arena. Each block is preceded by its size (for realloc). */
#define ARENA_SIZE (16 * 1024)
static _Alignas(16) unsigned char arena[ARENA_SIZE];
static size_t arena_used;

static int in_arena(const void *p) {
  return (const unsigned char *)p >= arena && (const unsigned char *)p < arena + ARENA_SIZE;
}

static void *arena_malloc(void *ctx, size_t n) {
  size_t need = 16 + ((n + 15) & ~(size_t)15);
  if (n > ARENA_SIZE || ARENA_SIZE - arena_used < need) return malloc(n);
  unsigned char *p = arena + arena_used;
  memcpy(p, &n, sizeof n);
  arena_used += need;
  return p + 16;
}

static void arena_free(void *ctx, void *p) {
  if (!in_arena(p)) free(p);
}

static void *arena_realloc(void *ctx, void *p, size_t n) {
  if (p == NULL) return arena_malloc(ctx, n);
  if (!in_arena(p)) return realloc(p, n);
  size_t old;
  memcpy(&old, (unsigned char *)p - 16, sizeof old);
  void *q = arena_malloc(ctx, n);
  if (q) memcpy(q, p, old < n ? old : n);
  return q;
}

static yajl_alloc_funcs arena_funcs = {arena_malloc, arena_realloc, arena_free, NULL};

int mg_json_push_raw(lua_State *L, const char *text, size_t len, char *err, size_t errlen) {
  /* Nothing below raises between yajl_alloc and yajl_free: the callbacks touch no Lua. */
  checker_t c = {0};
  arena_used = 0;
  yajl_handle h = yajl_alloc(&check_callbacks, &arena_funcs, &c);
  if (!h) {
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  size_t pos;
  yajl_status st = yajl_parse(h, (const unsigned char *)text, len);
  if (st != yajl_status_ok) {
    pos = yajl_get_bytes_consumed(h);
  } else {
    st = yajl_complete_parse(h);
    pos = len;
  }
  if (st != yajl_status_ok) {
    format_parse_error(h, text, len, pos, c.abort, err, errlen);
    yajl_free(h);
    return -1;
  }
  yajl_free(h);
  while (len && is_yajl_space(text[len - 1])) len--;
  while (len && is_yajl_space(*text)) text++, len--;
  char *copy = lua_newuserdata(L, len);
  memcpy(copy, text, len);
  /* Valid text has no control byte inside a string, so any \v or \f is between tokens. */
  if (memchr(copy, '\v', len) || memchr(copy, '\f', len))
    for (size_t i = 0; i < len; i++)
      if (copy[i] == '\v' || copy[i] == '\f') copy[i] = ' ';
  push_raw_mt(L);
  lua_setmetatable(L, -2);
  return 0;
}

/* json.raw(text) -> a raw JSON value, or nil, "parse error at byte N: ..." as decode says it.
 * A raw value given to json.raw comes back as it is; a bigint gives its digits. */
static int l_raw(lua_State *L) {
  size_t len;
  const char *text;
  if (is_raw(L, 1, &text, &len)) {
    lua_settop(L, 1);
    return 1;
  }
  if (!is_bigint(L, 1, &text, &len)) text = luaL_checklstring(L, 1, &len);
  char msg[200];
  if (mg_json_push_raw(L, text, len, msg, sizeof msg) == 0) return 1;
  lua_pushnil(L);
  lua_pushstring(L, msg);
  return 2;
}

/* ------------------------------------------------------------------------------------------
 * The rest of the module
 * ---------------------------------------------------------------------------------------- */

/* json.array([t]) -> t marked as an array (a new empty one when T is absent), so that it
 * encodes as [] while empty. A table with some other metatable is refused. */
static int l_array(lua_State *L) {
  if (lua_isnoneornil(L, 1)) {
    lua_settop(L, 0);
    lua_createtable(L, 0, 0);
  }
  luaL_checktype(L, 1, LUA_TTABLE);
  lua_settop(L, 1);
  push_array_mt(L);
  if (lua_getmetatable(L, 1)) {
    if (!lua_rawequal(L, -1, -2)) return luaL_argerror(L, 1, "table already has a metatable");
    lua_pop(L, 1);
  }
  lua_setmetatable(L, 1);
  return 1;
}

int luaopen_mg_json(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"encode", l_encode},
    {"decode", l_decode},
    {"array", l_array},
    {"raw", l_raw},
    {NULL, NULL},
  };
  lua_pushlightuserdata(L, (void *)&guard_mt_key);
  lua_rawget(L, LUA_REGISTRYINDEX);
  if (lua_isnil(L, -1)) {
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, on_guard_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushlightuserdata(L, (void *)&guard_mt_key);
    lua_insert(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
  }
  lua_pop(L, 1);

  lua_createtable(L, 0, 6);
  luaL_register(L, NULL, funcs);
  mg_json_push_null(L);
  lua_setfield(L, -2, "null");
  push_array_mt(L);
  lua_setfield(L, -2, "array_mt");
  return 1;
}
