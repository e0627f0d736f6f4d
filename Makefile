# moongate build. `make` builds build/moongate; `make test` runs every test and ends with
# "N passed, N failed"; `make asan` runs the same suite under ASan+UBSan; `make run` starts
# the gateway on examples/gateway.lua; `make bench` compares it with nginx and HAProxy.

BUILD      ?= build
CC         ?= cc
PYTHON     ?= /usr/bin/python3
LLHTTP_DIR ?= /usr/share/llhttp
LLHTTP_INC ?= /usr/share/include/llhttp
PKGS       := luajit libuv yajl openssl

DEPS_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
DEPS_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lm

OPT      ?= -O2
# Link-time optimisation for the gateway binary: objects carry GCC's IR and, with
# -ffat-lto-objects, ordinary code too, so the test programs link them without LTO (fast) and
# build/moongate is optimised as one unit (about 5 % fewer instructions per proxied request, see
# README "Benchmark"). `make LTO=` builds without it (and a compiler other than GCC needs its
# own flags here, e.g. `CC=clang LTO=`); the sanitizer build (clang) leaves it out.
LTO      ?= -flto=auto -ffat-lto-objects
CFLAGS_WARN := -Wall -Wextra -Werror -Wformat=2 -Wno-unused-parameter
CFLAGS   += -std=c11 -D_GNU_SOURCE $(OPT) -g $(CFLAGS_WARN) -fstack-protector-strong \
            -I$(LLHTTP_INC) -Isrc $(DEPS_CFLAGS) $(EXTRA_CFLAGS)
LDFLAGS  += $(EXTRA_LDFLAGS)

SRCS     := $(wildcard src/*.c)
LIB_SRCS := $(filter-out src/main.c,$(SRCS))
LIB_OBJS := $(LIB_SRCS:src/%.c=$(BUILD)/obj/%.o)
LLHTTP_OBJS := $(BUILD)/obj/llhttp/llhttp.o $(BUILD)/obj/llhttp/api.o $(BUILD)/obj/llhttp/http.o
CTESTS   := $(patsubst spec/00-c/%.c,$(BUILD)/tests/%,$(wildcard spec/00-c/test_*.c))

.PHONY: all test asan run bench deps clean check-deps

all: $(BUILD)/moongate $(CTESTS)

$(BUILD)/obj/%.o: src/%.c $(wildcard src/*.h) | $(BUILD)/obj
	$(CC) $(CFLAGS) $(LTO) -DMG_LUA_DIR='"$(CURDIR)/lua"' -c $< -o $@

# The config loader embeds lua/moongate/config.lua into the binary.
$(BUILD)/obj/mg_config.o: lua/moongate/config.lua
$(BUILD)/obj/mg_lua_aggregate.o: lua/moongate/aggregate.lua

# llhttp from Debian's node-llhttp sources, in strict mode, no lenient flags (see README).
$(BUILD)/obj/llhttp/%.o: $(LLHTTP_DIR)/%.c | $(BUILD)/obj
	@mkdir -p $(dir $@)
	$(CC) -std=c11 $(OPT) $(LTO) -g -w -DLLHTTP_STRICT_MODE=1 -I$(LLHTTP_INC) $(EXTRA_CFLAGS) -c $< -o $@

$(BUILD)/libmg.a: $(LIB_OBJS) $(LLHTTP_OBJS)
	ar rcs $@ $^

# Linked from the objects themselves (not libmg.a), so the LTO plugin sees every one of them.
$(BUILD)/moongate: $(BUILD)/obj/main.o $(LIB_OBJS) $(LLHTTP_OBJS)
	$(CC) $(CFLAGS) $(LTO) $(LDFLAGS) -o $@ $^ $(DEPS_LIBS)

$(BUILD)/tests/%: spec/00-c/%.c $(wildcard spec/00-c/*.h) $(BUILD)/libmg.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -Ispec/00-c $(LDFLAGS) -o $@ $< $(BUILD)/libmg.a $(DEPS_LIBS)

$(BUILD)/obj:
	@mkdir -p $@

deps:
	@scripts/deps.sh

test: deps
	@$(MAKE) --no-print-directory all
	@BUILD=$(BUILD) PYTHON=$(PYTHON) scripts/test.sh

asan: deps
	@$(MAKE) --no-print-directory all BUILD=build-asan OPT=-O1 CC=clang LTO= \
	  EXTRA_CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer" \
	  EXTRA_LDFLAGS="-fsanitize=address,undefined"
	@BUILD=build-asan PYTHON=$(PYTHON) MG_SANITIZED=1 scripts/test.sh

run: deps
	@$(MAKE) --no-print-directory $(BUILD)/moongate
	$(BUILD)/moongate -c examples/gateway.lua

bench: deps
	-@$(MAKE) --no-print-directory $(BUILD)/moongate
	@scripts/bench.sh

clean:
	rm -rf build build-asan
