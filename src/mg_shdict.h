/* mg_shdict: a bounded key/value dictionary in shared memory, the C core of mg.shared.NAME.
 * The master creates each dictionary before it forks the workers: one anonymous MAP_SHARED
 * mapping holds a header (the lock and the counters), a hash table and an arena of entries,
 * so every worker reads and writes the same memory and an incr from all of them at once
 * loses no count. Values are strings, numbers (double) or booleans, each with its type tag,
 * so Lua gets back what it stored. Entries may carry a TTL (CLOCK_MONOTONIC, the same clock
 * in every process on the machine); when the arena is full, expired entries go first, then
 * the least recently used ones.
 *
 * One process-shared, robust mutex guards a dictionary. Every operation takes it once, does
 * no allocation and no system call inside (a value is copied in or out with memcpy), and
 * releases it. If a process dies while it holds the lock, the next locker gets EOWNERDEAD:
 * when the dead process had not started changing the structures, nothing is lost; when it
 * was in the middle of a change, the dictionary is flushed (emptied), because a half-linked
 * list cannot be trusted and a rate-limit counter restarting from zero is the safe failure.
 * mg_shdict_stats counts both events so the caller can log them. None of these functions may
 * be called from a signal handler.
 *
 * Keys are byte strings of 1 to MG_SHDICT_KEY_MAX bytes (NUL bytes allowed). Functions return
 * a negative MG_SHDICT_E_* code on failure; queries return 1 (found) or 0 (absent). */
#ifndef MG_SHDICT_H
#define MG_SHDICT_H

#include <stddef.h>
#include <stdint.h>

/* Error codes: name, value, message. Messages are short and lowercase, as the Lua side
 * returns them (`nil, "no memory"`). */
#define MG_SHDICT_ERRNO_MAP(X)                                                   \
  X(NOT_FOUND, -1, "not found")                                                  \
  X(EXISTS, -2, "exists")                                                        \
  X(NOT_NUMBER, -3, "not a number")                                              \
  X(NO_MEMORY, -4, "no memory")                                                  \
  X(BAD_KEY, -5, "bad key")                                                      \
  X(BAD_VALUE, -6, "bad value")                                                  \
  X(BAD_TTL, -7, "bad ttl")                                                      \
  X(BUFFER, -8, "buffer too small")                                              \
  X(LOCK, -9, "lock failed")

enum {
#define MG_SHDICT_X(name, code, msg) MG_SHDICT_E_##name = code,
  MG_SHDICT_ERRNO_MAP(MG_SHDICT_X)
#undef MG_SHDICT_X
};

#define MG_SHDICT_KEY_MAX 65535          /* longest key, in bytes */
#define MG_SHDICT_NAME_MAX 63            /* longest dictionary name */
#define MG_SHDICT_MIN_SIZE 8192          /* smallest mapping mg_shdict_create accepts */
#define MG_SHDICT_MAX_SIZE 0xFFFF0000u   /* largest: offsets inside the mapping are 32-bit */
#define MG_SHDICT_TTL_MAX 1e9            /* longest TTL in seconds (about 31 years) */

typedef enum mg_shdict_type {
  MG_SHDICT_NIL = 0,     /* no value (only in a get that found nothing) */
  MG_SHDICT_STRING = 1,  /* str/len */
  MG_SHDICT_NUMBER = 2,  /* num */
  MG_SHDICT_BOOLEAN = 3, /* num, 0 or 1 */
} mg_shdict_type_t;

/* A value going in (set/add/replace) or coming out (get). For a string coming out, str points
 * into the caller's buffer. */
typedef struct mg_shdict_value {
  mg_shdict_type_t type;
  double num;
  const char *str;
  size_t len;
} mg_shdict_value_t;

/* Counters read under the lock in one go. */
typedef struct mg_shdict_stats {
  size_t entries;         /* live and not yet reclaimed expired entries */
  size_t capacity;        /* bytes of the arena (entries plus their headers) */
  size_t bytes_free;      /* free bytes in the arena (may be fragmented) */
  uint64_t evictions;     /* unexpired entries evicted to make room */
  uint64_t expirations;   /* expired entries reclaimed */
  uint64_t owner_deaths;  /* times a process died holding the lock */
  uint64_t torn_flushes;  /* of those, times it died mid-change and the dict was flushed */
} mg_shdict_stats_t;

/* Stages at which a test hook runs while the lock is held. */
enum {
  MG_SHDICT_HOOK_LOCKED = 0, /* lock taken, structures not yet touched */
  MG_SHDICT_HOOK_DIRTY = 1,  /* the operation has declared that it is changing structures */
};

typedef struct mg_shdict mg_shdict_t;

/* Milliseconds on a monotonic clock; tests inject one with mg_shdict_set_clock. */
typedef uint64_t (*mg_shdict_clock_fn)(void);

/* Called with the lock held at each stage (tests only: it lets a child die inside). */
typedef void (*mg_shdict_hook_fn)(mg_shdict_t *d, int stage);

/* Maps BYTES (rounded up to a page; MG_SHDICT_MIN_SIZE..MG_SHDICT_MAX_SIZE) of shared memory
 * for dictionary NAME (1..MG_SHDICT_NAME_MAX bytes). Call before fork: children inherit the
 * mapping and the returned handle. Returns NULL with errno EINVAL (bad name or size) or
 * ENOMEM. The caller owns the handle and releases it with mg_shdict_destroy. */
mg_shdict_t *mg_shdict_create(const char *name, size_t bytes);

/* Unmaps this process's view and frees the handle. The memory goes back to the system when
 * the last process holding the mapping unmaps it or exits. */
void mg_shdict_destroy(mg_shdict_t *d);

/* The dictionary's name. */
const char *mg_shdict_name(const mg_shdict_t *d);

/* Looks KEY up. Returns 1 and fills OUT (a string is copied into BUF, of CAP bytes, and
 * OUT->str points at it), 0 when absent or expired, MG_SHDICT_E_BUFFER when the string is
 * longer than CAP (OUT->len then holds its length: grow the buffer outside and retry), or
 * another negative code. A hit makes the entry the most recently used. */
int mg_shdict_get(mg_shdict_t *d, const char *key, size_t klen, mg_shdict_value_t *out,
                  char *buf, size_t cap);

/* Stores V under KEY for TTL seconds (0 = forever), replacing any value and its TTL. Returns
 * 0, 1 when unexpired entries were evicted to make room (OpenResty's "forcible"),
 * MG_SHDICT_E_NO_MEMORY when the entry is larger than the whole arena (nothing changes), or
 * BAD_KEY / BAD_VALUE / BAD_TTL (nothing changes). */
int mg_shdict_set(mg_shdict_t *d, const char *key, size_t klen, const mg_shdict_value_t *v,
                  double ttl);

/* Like mg_shdict_set, but only when KEY is absent or expired; else MG_SHDICT_E_EXISTS. */
int mg_shdict_add(mg_shdict_t *d, const char *key, size_t klen, const mg_shdict_value_t *v,
                  double ttl);

/* Like mg_shdict_set, but only when KEY is present; else MG_SHDICT_E_NOT_FOUND. */
int mg_shdict_replace(mg_shdict_t *d, const char *key, size_t klen,
                      const mg_shdict_value_t *v, double ttl);

/* Adds DELTA to the number under KEY atomically and stores the result in *OUT; the entry
 * keeps its TTL. When KEY is absent: with INIT non-NULL, stores *INIT + DELTA with INIT_TTL
 * seconds (0 = forever), else returns MG_SHDICT_E_NOT_FOUND. Returns 0, 1 (created with
 * eviction, as set), MG_SHDICT_E_NOT_NUMBER for a string or boolean, MG_SHDICT_E_BAD_VALUE
 * for a non-finite DELTA or *INIT, or another negative code. */
int mg_shdict_incr(mg_shdict_t *d, const char *key, size_t klen, double delta,
                   const double *init, double init_ttl, double *out);

/* Remaining life of KEY: returns 1 with *REMAINING in seconds (0 = never expires), 0 when
 * absent or expired, or a negative code. Does not change recency. */
int mg_shdict_ttl(mg_shdict_t *d, const char *key, size_t klen, double *remaining);

/* Gives KEY a new TTL (0 = forever) from now. Returns 0, MG_SHDICT_E_NOT_FOUND, or BAD_KEY /
 * BAD_TTL. */
int mg_shdict_expire(mg_shdict_t *d, const char *key, size_t klen, double ttl);

/* Removes KEY. Returns 1 when a live entry was removed, 0 when absent, or a negative code. */
int mg_shdict_delete(mg_shdict_t *d, const char *key, size_t klen);

/* Removes every entry (the counters in mg_shdict_stats stay). Returns 0 or a negative code. */
int mg_shdict_flush_all(mg_shdict_t *d);

/* Reclaims up to MAX expired entries (0 = all), walking every entry under the lock: for a
 * timer, not the request path. Returns how many were reclaimed, or a negative code. */
int mg_shdict_flush_expired(mg_shdict_t *d, size_t max);

/* Fills *OUT with the counters. Returns 0 or a negative code. */
int mg_shdict_stats(mg_shdict_t *d, mg_shdict_stats_t *out);

/* Walks every structure (arena blocks, free lists, hash chains, LRU list, counters) and
 * returns 0 when all agree, or the source line of the first check that failed (tests). */
int mg_shdict_verify(mg_shdict_t *d);

/* Replaces this process's clock (NULL: CLOCK_MONOTONIC). Tests only. */
void mg_shdict_set_clock(mg_shdict_t *d, mg_shdict_clock_fn now_ms);

/* Sets this process's lock hook (NULL: none). Tests only. */
void mg_shdict_set_hook(mg_shdict_t *d, mg_shdict_hook_fn hook);

/* The message for an MG_SHDICT_E_* code ("unknown error" for anything else). */
const char *mg_shdict_strerror(int err);

/* The name of an MG_SHDICT_E_* code, e.g. "NO_MEMORY" ("UNKNOWN" for anything else). */
const char *mg_shdict_errname(int err);

#endif
