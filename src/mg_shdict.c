/* mg_shdict: dictionaries in shared memory (see mg_shdict.h for the contract).
 *
 * Layout of one mapping, every reference a 32-bit offset from its start (0 = none), so the
 * structures mean the same thing in every process whatever address the mapping has:
 *
 *   [ shm_t header | hash buckets (uint32 offsets) | arena of blocks ............ ]
 *
 * The arena is a boundary-tag allocator: each block starts with its size (low bit: in use)
 * and the size of the block before it, so a freed block merges with both neighbours at once
 * and freeing everything always leaves one block the size of the arena. That is what makes
 * "cannot fit" a simple test: an entry fits after enough eviction exactly when it is no
 * larger than the arena. Free blocks sit in segregated lists by power of two (a search
 * looks at one list first-fit, then takes the head of any larger list). A used block is an
 * entry: block header, hash-chain and LRU links, the key, then the value.
 *
 * Why not slabs per size class, as nginx's lua_shared_dict has: pages given to small
 * classes stay there, so a dict full of small entries can fail to store a large one however
 * much it evicts. Boundary tags cost some fragmentation instead, which eviction undoes. */
#include "mg_shdict.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define SHM_MAGIC 0x6d672d7368646374ull /* "mg-shdct" */
#define USED 1u
#define MIN_BLOCK 32u   /* smallest free block worth splitting off */
#define NBINS 32
#define EXPIRE_SCAN 128 /* when full: how far from the LRU tail to look for expired entries */
#define EXPIRE_ON_STORE 2 /* each store reclaims up to this many expired entries at the tail */

/* ---------------------------------------------------------------------------------------
 * Shared structures */

typedef struct blk {
  uint32_t size;      /* bytes of the whole block, a multiple of 8; | USED when in use */
  uint32_t prev_size; /* size of the block before (0 for the first) */
} blk_t;

typedef struct freeblk {
  blk_t b;
  uint32_t next, prev; /* neighbours in its size list */
} freeblk_t;

typedef struct entry {
  blk_t b;
  uint32_t hnext;              /* next entry in the hash chain */
  uint32_t lru_prev, lru_next; /* towards the most / least recently used */
  uint32_t klen, vlen;
  uint8_t type;
  uint8_t pad[3];
  uint64_t hash;
  uint64_t expires; /* clock ms; 0 = never */
  double num;       /* NUMBER and BOOLEAN */
  char data[];      /* key, then a string value */
} entry_t;

typedef struct shm {
  uint64_t magic;
  pthread_mutex_t lock;
  /* Set before an operation changes any structure, cleared after: a process that died with
   * it set may have left a list half-linked. Atomic so that the compiler keeps the stores in
   * order around the changes; the hardware does the rest (a killed process's stores land). */
  _Atomic int dirty;
  uint32_t size; /* of the mapping */
  uint32_t buckets_off, nbuckets; /* nbuckets is a power of two */
  uint32_t arena_off, arena_end;
  uint32_t lru_head, lru_tail; /* most and least recently used */
  uint32_t bins[NBINS];
  uint64_t seed0, seed1; /* SipHash key, fixed at creation */
  uint64_t entries, free_bytes;
  uint64_t evictions, expirations, owner_deaths, torn_flushes;
  char name[MG_SHDICT_NAME_MAX + 1];
} shm_t;

/* The per-process handle: inherited across fork as a copy, pointing at the shared mapping. */
struct mg_shdict {
  shm_t *h;
  size_t map_size;
  mg_shdict_clock_fn now_ms;
  mg_shdict_hook_fn hook;
};

static inline blk_t *B(shm_t *h, uint32_t off) { return (blk_t *)((char *)h + off); }
static inline freeblk_t *F(shm_t *h, uint32_t off) { return (freeblk_t *)((char *)h + off); }
static inline entry_t *E(shm_t *h, uint32_t off) { return (entry_t *)((char *)h + off); }
static inline uint32_t *buckets(shm_t *h) { return (uint32_t *)((char *)h + h->buckets_off); }
static inline uint32_t bsize(shm_t *h, uint32_t off) { return B(h, off)->size & ~USED; }
static inline size_t round8(size_t n) { return (n + 7) & ~(size_t)7; }
static inline unsigned bin_of(uint32_t size) { return 31u - (unsigned)__builtin_clz(size); }

/* ---------------------------------------------------------------------------------------
 * Hashing: SipHash-1-3 with a random key per dictionary, because keys come from clients
 * (addresses, API keys) and a fixed hash would let them lengthen one chain at will. */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                          \
  do {                                                                                    \
    v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                             \
    v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                                \
    v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                                \
    v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                             \
  } while (0)

static uint64_t siphash13(uint64_t k0, uint64_t k1, const unsigned char *p, size_t n) {
  uint64_t v0 = k0 ^ 0x736f6d6570736575ull, v1 = k1 ^ 0x646f72616e646f6dull;
  uint64_t v2 = k0 ^ 0x6c7967656e657261ull, v3 = k1 ^ 0x7465646279746573ull;
  uint64_t m, b = (uint64_t)n << 56;
  const unsigned char *end = p + (n & ~(size_t)7);
  for (; p != end; p += 8) {
    memcpy(&m, p, 8);
    v3 ^= m;
    SIPROUND;
    v0 ^= m;
  }
  for (size_t i = 0; i < (n & 7); i++) b |= (uint64_t)p[i] << (8 * i);
  v3 ^= b;
  SIPROUND;
  v0 ^= b;
  v2 ^= 0xff;
  SIPROUND;
  SIPROUND;
  SIPROUND;
  return v0 ^ v1 ^ v2 ^ v3;
}

/* ---------------------------------------------------------------------------------------
 * Arena allocator */

static void bin_insert(shm_t *h, uint32_t off) {
  freeblk_t *f = F(h, off);
  unsigned i = bin_of(f->b.size);
  f->prev = 0;
  f->next = h->bins[i];
  if (f->next) F(h, f->next)->prev = off;
  h->bins[i] = off;
}

static void bin_remove(shm_t *h, uint32_t off) {
  freeblk_t *f = F(h, off);
  if (f->prev)
    F(h, f->prev)->next = f->next;
  else
    h->bins[bin_of(f->b.size)] = f->next;
  if (f->next) F(h, f->next)->prev = f->prev;
}

/* Takes a block of NEED bytes (a multiple of 8) from the free lists; 0 when none is large
 * enough. */
static uint32_t block_alloc(shm_t *h, uint32_t need) {
  unsigned i = bin_of(need);
  uint32_t off = 0;
  for (uint32_t o = h->bins[i]; o; o = F(h, o)->next)
    if (F(h, o)->b.size >= need) {
      off = o;
      break;
    }
  for (unsigned j = i + 1; !off && j < NBINS; j++) off = h->bins[j];
  if (!off) return 0;
  bin_remove(h, off);
  uint32_t size = B(h, off)->size;
  if (size - need >= MIN_BLOCK) {
    uint32_t rest = off + need, next = off + size;
    B(h, rest)->size = size - need;
    B(h, rest)->prev_size = need;
    if (next < h->arena_end) B(h, next)->prev_size = size - need;
    bin_insert(h, rest);
    size = need;
  }
  B(h, off)->size = size | USED;
  h->free_bytes -= size;
  return off;
}

/* Returns the block at OFF to the free lists, merged with whichever neighbours are free. */
static void block_free(shm_t *h, uint32_t off) {
  uint32_t size = bsize(h, off);
  h->free_bytes += size;
  uint32_t next = off + size;
  if (next < h->arena_end && !(B(h, next)->size & USED)) {
    bin_remove(h, next);
    size += B(h, next)->size;
  }
  if (off > h->arena_off) {
    uint32_t prev = off - B(h, off)->prev_size;
    if (!(B(h, prev)->size & USED)) {
      bin_remove(h, prev);
      size += B(h, prev)->size;
      off = prev;
    }
  }
  B(h, off)->size = size;
  next = off + size;
  if (next < h->arena_end) B(h, next)->prev_size = size;
  bin_insert(h, off);
}

/* Empties every structure: one free block, no entries. Used by create, flush_all, and the
 * recovery from a process that died mid-change. */
static void reset(shm_t *h) {
  memset(buckets(h), 0, (size_t)h->nbuckets * sizeof(uint32_t));
  memset(h->bins, 0, sizeof h->bins);
  h->lru_head = h->lru_tail = 0;
  h->entries = 0;
  blk_t *b = B(h, h->arena_off);
  b->size = h->arena_end - h->arena_off;
  b->prev_size = 0;
  h->free_bytes = b->size;
  bin_insert(h, h->arena_off);
}

/* ---------------------------------------------------------------------------------------
 * Entries: hash chains and the LRU list */

static inline int expired(const entry_t *e, uint64_t now) {
  return e->expires != 0 && e->expires <= now;
}

static void lru_unlink(shm_t *h, uint32_t off) {
  entry_t *e = E(h, off);
  if (e->lru_prev)
    E(h, e->lru_prev)->lru_next = e->lru_next;
  else
    h->lru_head = e->lru_next;
  if (e->lru_next)
    E(h, e->lru_next)->lru_prev = e->lru_prev;
  else
    h->lru_tail = e->lru_prev;
}

static void lru_push(shm_t *h, uint32_t off) {
  entry_t *e = E(h, off);
  e->lru_prev = 0;
  e->lru_next = h->lru_head;
  if (h->lru_head)
    E(h, h->lru_head)->lru_prev = off;
  else
    h->lru_tail = off;
  h->lru_head = off;
}

static void lru_touch(shm_t *h, uint32_t off) {
  if (h->lru_head == off) return;
  lru_unlink(h, off);
  lru_push(h, off);
}

static uint32_t find(shm_t *h, const char *key, uint32_t klen, uint64_t hash) {
  for (uint32_t o = buckets(h)[hash & (h->nbuckets - 1)]; o; o = E(h, o)->hnext) {
    entry_t *e = E(h, o);
    if (e->hash == hash && e->klen == klen && memcmp(e->data, key, klen) == 0) return o;
  }
  return 0;
}

/* Unlinks the entry at OFF from its chain and the LRU list and frees its block. */
static void entry_remove(shm_t *h, uint32_t off) {
  entry_t *e = E(h, off);
  uint32_t *link = &buckets(h)[e->hash & (h->nbuckets - 1)];
  while (*link != off) link = &E(h, *link)->hnext;
  *link = e->hnext;
  lru_unlink(h, off);
  h->entries--;
  block_free(h, off);
}

/* Finds KEY's live entry; an expired one found on the way is reclaimed. */
static uint32_t lookup(shm_t *h, const char *key, uint32_t klen, uint64_t hash, uint64_t now) {
  uint32_t off = find(h, key, klen, hash);
  if (off && expired(E(h, off), now)) {
    entry_remove(h, off);
    h->expirations++;
    return 0;
  }
  return off;
}

/* Reclaims expired entries among the SCAN least recently used, up to MAX of them (0 = no
 * limit). Returns how many. */
static size_t expire_tail(shm_t *h, uint64_t now, size_t scan, size_t max) {
  size_t n = 0, seen = 0;
  for (uint32_t o = h->lru_tail; o && (scan == 0 || seen < scan); seen++) {
    uint32_t prev = E(h, o)->lru_prev;
    if (expired(E(h, o), now)) {
      entry_remove(h, o);
      h->expirations++;
      if (++n == max) break;
    }
    o = prev;
  }
  return n;
}

/* Allocates NEED bytes for a new entry, making room when the arena is full: first expired
 * entries near the LRU tail, then the least recently used, one at a time. Sets *FORCIBLE
 * when a live entry went. Returns 0 only when NEED exceeds the arena. */
static uint32_t entry_alloc(shm_t *h, uint32_t need, uint64_t now, int *forcible) {
  uint32_t off = block_alloc(h, need);
  if (off) return off;
  if (expire_tail(h, now, EXPIRE_SCAN, 0) && (off = block_alloc(h, need))) return off;
  while (h->lru_tail) {
    uint32_t victim = h->lru_tail;
    if (expired(E(h, victim), now)) {
      h->expirations++;
    } else {
      h->evictions++;
      *forcible = 1;
    }
    entry_remove(h, victim);
    if ((off = block_alloc(h, need))) return off;
  }
  return 0;
}

/* Creates KEY's entry (absent before) of NEED bytes and links it as the most recent. */
static uint32_t entry_new(shm_t *h, const char *key, uint32_t klen, uint64_t hash,
                          uint32_t need, uint64_t now, int *forcible) {
  uint32_t off = entry_alloc(h, need, now, forcible);
  if (!off) return 0;
  entry_t *e = E(h, off);
  e->hash = hash;
  e->klen = klen;
  memcpy(e->data, key, klen);
  uint32_t *bucket = &buckets(h)[hash & (h->nbuckets - 1)];
  e->hnext = *bucket;
  *bucket = off;
  lru_push(h, off);
  h->entries++;
  return off;
}

static void entry_put(entry_t *e, const mg_shdict_value_t *v, uint64_t expires) {
  e->type = (uint8_t)v->type;
  e->expires = expires;
  e->num = v->type == MG_SHDICT_NUMBER ? v->num : v->type == MG_SHDICT_BOOLEAN ? (v->num != 0) : 0;
  e->vlen = v->type == MG_SHDICT_STRING ? (uint32_t)v->len : 0;
  if (e->vlen) memcpy(e->data + e->klen, v->str, e->vlen);
}

/* ---------------------------------------------------------------------------------------
 * Locking */

static uint64_t monotonic_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Takes the lock; WRITING says the operation may change structures (it then sets the dirty
 * mark). A previous owner that died is handled here: see the header for the policy. */
static int lock(mg_shdict_t *d, int writing) {
  shm_t *h = d->h;
  int rc = pthread_mutex_lock(&h->lock);
  if (rc == EOWNERDEAD) {
    h->owner_deaths++;
    if (atomic_load(&h->dirty)) {
      /* Dirty stays set until the unlock, so a death during this reset is caught too. */
      reset(h);
      h->torn_flushes++;
    }
    pthread_mutex_consistent(&h->lock);
  } else if (rc != 0) {
    return MG_SHDICT_E_LOCK;
  }
  if (d->hook) d->hook(d, MG_SHDICT_HOOK_LOCKED);
  if (writing) {
    atomic_store(&h->dirty, 1);
    if (d->hook) d->hook(d, MG_SHDICT_HOOK_DIRTY);
  }
  return 0;
}

static void unlock(mg_shdict_t *d) {
  atomic_store_explicit(&d->h->dirty, 0, memory_order_release);
  pthread_mutex_unlock(&d->h->lock);
}

/* ---------------------------------------------------------------------------------------
 * Argument checks (all before the lock, so an error changes nothing) */

static int check_key(const char *key, size_t klen) {
  return key && klen >= 1 && klen <= MG_SHDICT_KEY_MAX ? 0 : MG_SHDICT_E_BAD_KEY;
}

static int check_ttl(double ttl, uint64_t now, uint64_t *expires) {
  if (!(ttl >= 0 && ttl <= MG_SHDICT_TTL_MAX)) return MG_SHDICT_E_BAD_TTL; /* NaN fails too */
  if (ttl == 0) {
    *expires = 0;
    return 0;
  }
  double x = ttl * 1000.0;
  uint64_t ms = (uint64_t)x;
  if ((double)ms < x || ms == 0) ms++; /* round up: a TTL never ends early */
  *expires = now + ms;
  return 0;
}

static int check_value(const mg_shdict_value_t *v) {
  if (!v) return MG_SHDICT_E_BAD_VALUE;
  switch (v->type) {
  case MG_SHDICT_STRING:
    return v->str || v->len == 0 ? 0 : MG_SHDICT_E_BAD_VALUE;
  case MG_SHDICT_NUMBER:
  case MG_SHDICT_BOOLEAN:
    return 0;
  default:
    return MG_SHDICT_E_BAD_VALUE;
  }
}

static inline uint64_t key_hash(mg_shdict_t *d, const char *key, size_t klen) {
  return siphash13(d->h->seed0, d->h->seed1, (const unsigned char *)key, klen);
}

/* ---------------------------------------------------------------------------------------
 * Public API */

mg_shdict_t *mg_shdict_create(const char *name, size_t bytes) {
  size_t nlen = name ? strlen(name) : 0;
  if (nlen == 0 || nlen > MG_SHDICT_NAME_MAX || bytes < MG_SHDICT_MIN_SIZE ||
      bytes > MG_SHDICT_MAX_SIZE) {
    errno = EINVAL;
    return NULL;
  }
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  size_t size = (bytes + page - 1) & ~(page - 1);
  mg_shdict_t *d = calloc(1, sizeof *d);
  if (!d) return NULL;
  void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    free(d);
    errno = ENOMEM;
    return NULL;
  }
  shm_t *h = p; /* the mapping starts zeroed */
  pthread_mutexattr_t attr;
  int rc = pthread_mutexattr_init(&attr);
  if (!rc) rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  if (!rc) rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  if (!rc) rc = pthread_mutex_init(&h->lock, &attr);
  pthread_mutexattr_destroy(&attr);
  if (rc) {
    munmap(p, size);
    free(d);
    errno = rc;
    return NULL;
  }
  /* About one bucket per 128 bytes of arena (3% of the mapping): chains stay short even
   * when the entries are small. */
  uint32_t nb = 16;
  while ((size_t)nb * 2 <= size / 128) nb *= 2;
  h->size = (uint32_t)size;
  h->nbuckets = nb;
  h->buckets_off = (uint32_t)((sizeof(shm_t) + 63) & ~(size_t)63);
  h->arena_off = (uint32_t)round8(h->buckets_off + (size_t)nb * sizeof(uint32_t));
  h->arena_end = h->arena_off + (uint32_t)((size - h->arena_off) & ~(size_t)7);
  uint64_t seed[2];
  if (getrandom(seed, sizeof seed, GRND_NONBLOCK) != (ssize_t)sizeof seed) {
    /* No entropy yet (early boot): a weaker key is better than refusing to start. */
    seed[0] = monotonic_ms() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)p;
    seed[1] = (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ull ^ (uint64_t)(uintptr_t)d;
  }
  h->seed0 = seed[0];
  h->seed1 = seed[1];
  memcpy(h->name, name, nlen + 1);
  reset(h);
  h->magic = SHM_MAGIC;
  d->h = h;
  d->map_size = size;
  d->now_ms = monotonic_ms;
  return d;
}

void mg_shdict_destroy(mg_shdict_t *d) {
  if (!d) return;
  munmap(d->h, d->map_size);
  free(d);
}

const char *mg_shdict_name(const mg_shdict_t *d) { return d->h->name; }

int mg_shdict_get(mg_shdict_t *d, const char *key, size_t klen, mg_shdict_value_t *out,
                  char *buf, size_t cap) {
  int rc = check_key(key, klen);
  if (rc) return rc;
  uint64_t hash = key_hash(d, key, klen), now = d->now_ms();
  out->type = MG_SHDICT_NIL;
  out->num = 0;
  out->str = NULL;
  out->len = 0;
  if ((rc = lock(d, 1))) return rc;
  shm_t *h = d->h;
  uint32_t off = lookup(h, key, (uint32_t)klen, hash, now);
  if (!off) {
    unlock(d);
    return 0;
  }
  entry_t *e = E(h, off);
  lru_touch(h, off); /* a hit, even one the caller must retry with a larger buffer */
  if (e->type == MG_SHDICT_STRING) {
    out->len = e->vlen;
    if (e->vlen > cap) {
      unlock(d);
      return MG_SHDICT_E_BUFFER;
    }
    if (e->vlen) memcpy(buf, e->data + e->klen, e->vlen);
    out->str = buf;
  }
  out->type = (mg_shdict_type_t)e->type;
  out->num = e->num;
  unlock(d);
  return 1;
}

enum { STORE_SET, STORE_ADD, STORE_REPLACE };

static int store(mg_shdict_t *d, int mode, const char *key, size_t klen,
                 const mg_shdict_value_t *v, double ttl) {
  int rc = check_key(key, klen);
  if (!rc) rc = check_value(v);
  uint64_t now = d->now_ms(), expires = 0;
  if (!rc) rc = check_ttl(ttl, now, &expires);
  if (rc) return rc;
  shm_t *h = d->h;
  size_t vlen = v->type == MG_SHDICT_STRING ? v->len : 0;
  size_t arena = h->arena_end - h->arena_off;
  if (vlen > arena || round8(sizeof(entry_t) + klen + vlen) > arena)
    return MG_SHDICT_E_NO_MEMORY;
  uint32_t need = (uint32_t)round8(sizeof(entry_t) + klen + vlen);
  uint64_t hash = key_hash(d, key, klen);
  if ((rc = lock(d, 1))) return rc;
  uint32_t off = lookup(h, key, (uint32_t)klen, hash, now);
  if (off && mode == STORE_ADD) {
    unlock(d);
    return MG_SHDICT_E_EXISTS;
  }
  if (!off && mode == STORE_REPLACE) {
    unlock(d);
    return MG_SHDICT_E_NOT_FOUND;
  }
  /* Reclaim a little at the cold end on every write, as nginx does, so expired entries do
   * not wait for the dictionary to fill. OFF is live, so it is not among them. */
  expire_tail(h, now, EXPIRE_ON_STORE, EXPIRE_ON_STORE);
  int forcible = 0;
  if (off && bsize(h, off) >= need && bsize(h, off) - need < MIN_BLOCK) {
    lru_touch(h, off); /* same block size: overwrite in place */
  } else {
    if (off) entry_remove(h, off);
    off = entry_new(h, key, (uint32_t)klen, hash, need, now, &forcible);
    if (!off) { /* unreachable: NEED is no larger than the arena */
      unlock(d);
      return MG_SHDICT_E_NO_MEMORY;
    }
  }
  entry_put(E(h, off), v, expires);
  unlock(d);
  return forcible;
}

int mg_shdict_set(mg_shdict_t *d, const char *key, size_t klen, const mg_shdict_value_t *v,
                  double ttl) {
  return store(d, STORE_SET, key, klen, v, ttl);
}

int mg_shdict_add(mg_shdict_t *d, const char *key, size_t klen, const mg_shdict_value_t *v,
                  double ttl) {
  return store(d, STORE_ADD, key, klen, v, ttl);
}

int mg_shdict_replace(mg_shdict_t *d, const char *key, size_t klen,
                      const mg_shdict_value_t *v, double ttl) {
  return store(d, STORE_REPLACE, key, klen, v, ttl);
}

int mg_shdict_incr(mg_shdict_t *d, const char *key, size_t klen, double delta,
                   const double *init, double init_ttl, double *out) {
  int rc = check_key(key, klen);
  if (!rc && (!isfinite(delta) || (init && !isfinite(*init)))) rc = MG_SHDICT_E_BAD_VALUE;
  uint64_t now = d->now_ms(), expires = 0;
  if (!rc) rc = check_ttl(init_ttl, now, &expires);
  if (rc) return rc;
  shm_t *h = d->h;
  uint32_t need = (uint32_t)round8(sizeof(entry_t) + klen);
  if (need > h->arena_end - h->arena_off) return MG_SHDICT_E_NO_MEMORY;
  uint64_t hash = key_hash(d, key, klen);
  if ((rc = lock(d, 1))) return rc;
  uint32_t off = lookup(h, key, (uint32_t)klen, hash, now);
  if (off) {
    entry_t *e = E(h, off);
    if (e->type != MG_SHDICT_NUMBER) {
      unlock(d);
      return MG_SHDICT_E_NOT_NUMBER;
    }
    e->num += delta;
    *out = e->num;
    lru_touch(h, off);
    unlock(d);
    return 0;
  }
  if (!init) {
    unlock(d);
    return MG_SHDICT_E_NOT_FOUND;
  }
  int forcible = 0;
  expire_tail(h, now, EXPIRE_ON_STORE, EXPIRE_ON_STORE);
  off = entry_new(h, key, (uint32_t)klen, hash, need, now, &forcible);
  if (!off) {
    unlock(d);
    return MG_SHDICT_E_NO_MEMORY;
  }
  mg_shdict_value_t v = {.type = MG_SHDICT_NUMBER, .num = *init + delta};
  entry_put(E(h, off), &v, expires);
  *out = v.num;
  unlock(d);
  return forcible;
}

int mg_shdict_ttl(mg_shdict_t *d, const char *key, size_t klen, double *remaining) {
  int rc = check_key(key, klen);
  if (rc) return rc;
  uint64_t hash = key_hash(d, key, klen), now = d->now_ms();
  if ((rc = lock(d, 1))) return rc;
  uint32_t off = lookup(d->h, key, (uint32_t)klen, hash, now);
  if (off) {
    entry_t *e = E(d->h, off);
    *remaining = e->expires ? (double)(e->expires - now) / 1000.0 : 0;
  }
  unlock(d);
  return off ? 1 : 0;
}

int mg_shdict_expire(mg_shdict_t *d, const char *key, size_t klen, double ttl) {
  int rc = check_key(key, klen);
  uint64_t now = d->now_ms(), expires = 0;
  if (!rc) rc = check_ttl(ttl, now, &expires);
  if (rc) return rc;
  uint64_t hash = key_hash(d, key, klen);
  if ((rc = lock(d, 1))) return rc;
  uint32_t off = lookup(d->h, key, (uint32_t)klen, hash, now);
  if (off) E(d->h, off)->expires = expires;
  unlock(d);
  return off ? 0 : MG_SHDICT_E_NOT_FOUND;
}

int mg_shdict_delete(mg_shdict_t *d, const char *key, size_t klen) {
  int rc = check_key(key, klen);
  if (rc) return rc;
  uint64_t hash = key_hash(d, key, klen), now = d->now_ms();
  if ((rc = lock(d, 1))) return rc;
  uint32_t off = lookup(d->h, key, (uint32_t)klen, hash, now);
  if (off) entry_remove(d->h, off);
  unlock(d);
  return off ? 1 : 0;
}

int mg_shdict_flush_all(mg_shdict_t *d) {
  int rc = lock(d, 1);
  if (rc) return rc;
  reset(d->h);
  unlock(d);
  return 0;
}

int mg_shdict_flush_expired(mg_shdict_t *d, size_t max) {
  uint64_t now = d->now_ms();
  int rc = lock(d, 1);
  if (rc) return rc;
  size_t n = expire_tail(d->h, now, 0, max);
  unlock(d);
  return n > INT32_MAX ? INT32_MAX : (int)n;
}

int mg_shdict_stats(mg_shdict_t *d, mg_shdict_stats_t *out) {
  int rc = lock(d, 0);
  if (rc) return rc;
  shm_t *h = d->h;
  out->entries = (size_t)h->entries;
  out->capacity = h->arena_end - h->arena_off;
  out->bytes_free = (size_t)h->free_bytes;
  out->evictions = h->evictions;
  out->expirations = h->expirations;
  out->owner_deaths = h->owner_deaths;
  out->torn_flushes = h->torn_flushes;
  unlock(d);
  return 0;
}

/* Every check names its line; loops are bounded by the number of blocks, so a corrupted
 * list is reported rather than walked forever. */
#define VERIFY(cond) do { if (!(cond)) { bad = __LINE__; goto done; } } while (0)

int mg_shdict_verify(mg_shdict_t *d) {
  int rc = lock(d, 0);
  if (rc) return rc;
  shm_t *h = d->h;
  int bad = 0;
  uint64_t nblocks = 0, nfree = 0, free_bytes = 0, nused = 0;
  uint32_t prev_size = 0, off = h->arena_off;
  int prev_free = 0;
  VERIFY(h->magic == SHM_MAGIC);
  while (off < h->arena_end) {
    uint32_t size = bsize(h, off);
    int used = B(h, off)->size & USED;
    VERIFY(size >= MIN_BLOCK && size % 8 == 0 && size <= h->arena_end - off);
    VERIFY(B(h, off)->prev_size == prev_size);
    VERIFY(used || !prev_free); /* free neighbours are always merged */
    if (used) {
      entry_t *e = E(h, off);
      nused++;
      VERIFY(round8(sizeof(entry_t) + e->klen + e->vlen) <= size);
      VERIFY(e->type >= MG_SHDICT_STRING && e->type <= MG_SHDICT_BOOLEAN);
      VERIFY(e->type == MG_SHDICT_STRING || e->vlen == 0);
      VERIFY(e->hash == key_hash(d, e->data, e->klen));
      VERIFY(find(h, e->data, e->klen, e->hash) == off);
    } else {
      nfree++;
      free_bytes += size;
    }
    nblocks++;
    prev_size = size;
    prev_free = !used;
    off += size;
  }
  VERIFY(off == h->arena_end);
  VERIFY(free_bytes == h->free_bytes && nused == h->entries);
  uint64_t listed = 0;
  for (unsigned i = 0; i < NBINS; i++) {
    uint32_t prev = 0;
    for (uint32_t o = h->bins[i]; o; prev = o, o = F(h, o)->next) {
      VERIFY(++listed <= nfree);
      VERIFY(o >= h->arena_off && o < h->arena_end);
      VERIFY(!(B(h, o)->size & USED) && bin_of(B(h, o)->size) == i);
      VERIFY(F(h, o)->prev == prev);
    }
  }
  VERIFY(listed == nfree);
  uint64_t chained = 0;
  for (uint32_t i = 0; i < h->nbuckets; i++)
    for (uint32_t o = buckets(h)[i]; o; o = E(h, o)->hnext) {
      VERIFY(++chained <= nused);
      VERIFY((B(h, o)->size & USED) && (E(h, o)->hash & (h->nbuckets - 1)) == i);
    }
  VERIFY(chained == nused);
  uint64_t in_lru = 0;
  uint32_t prev = 0;
  for (uint32_t o = h->lru_head; o; prev = o, o = E(h, o)->lru_next) {
    VERIFY(++in_lru <= nused);
    VERIFY((B(h, o)->size & USED) && E(h, o)->lru_prev == prev);
  }
  VERIFY(in_lru == nused && h->lru_tail == prev);
done:
  unlock(d);
  return bad;
}

void mg_shdict_set_clock(mg_shdict_t *d, mg_shdict_clock_fn now_ms) {
  d->now_ms = now_ms ? now_ms : monotonic_ms;
}

void mg_shdict_set_hook(mg_shdict_t *d, mg_shdict_hook_fn hook) { d->hook = hook; }

const char *mg_shdict_strerror(int err) {
  switch (err) {
#define MG_SHDICT_X(name, code, msg) case code: return msg;
    MG_SHDICT_ERRNO_MAP(MG_SHDICT_X)
#undef MG_SHDICT_X
  }
  return "unknown error";
}

const char *mg_shdict_errname(int err) {
  switch (err) {
#define MG_SHDICT_X(name, code, msg) case code: return #name;
    MG_SHDICT_ERRNO_MAP(MG_SHDICT_X)
#undef MG_SHDICT_X
  }
  return "UNKNOWN";
}
