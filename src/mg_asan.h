/* mg_asan: marks memory that moongate keeps for reuse (free lists, spare objects) as off
 * limits to AddressSanitizer while it waits, so that a use after "free" of a kept block is
 * reported as it would be for memory given back to malloc. Without ASan the macros do
 * nothing. */
#ifndef MG_ASAN_H
#define MG_ASAN_H

#if defined(__SANITIZE_ADDRESS__)
#define MG_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MG_ASAN 1
#endif
#endif

#ifdef MG_ASAN
#include <sanitizer/asan_interface.h>
#define MG_ASAN_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define MG_ASAN_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define MG_ASAN_POISON(p, n) ((void)(p), (void)(n))
#define MG_ASAN_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#endif
