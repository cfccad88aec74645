# singleflight: build, test, bench, demo.
#
#   make            build singleflight.core for every Lua found
#   make test       install what the tests need (Debian, as root), then run
#                   the specs on every Lua version, luacheck, the C tests,
#                   the sanitizers and valgrind, and the specs again with
#                   the garbage collector at its most aggressive
#   make demo       the OpenResty stampede: a throwaway nginx and wrk, with
#                   and without singleflight (CLIENTS=, DURATION=,
#                   UPSTREAM_MS=, UPSTREAM_SLOTS=, WORKERS=)
#   make demo-fleet the stampede across a fleet: a throwaway redis-server
#                   and three nginx instances, with a group per instance
#                   (shm) and with shm + redis (STAMPEDE=, STAMPEDES=,
#                   ORIGIN_MS=, INSTANCES=, WORKERS=)
#   make bench      the numbers of BENCHMARKS.md

LUA_VERSIONS ?= 5.1 5.2 5.3 5.4 jit
CC ?= cc
OPT ?= -O2 -g
WARN ?= -std=c11 -Wall -Wextra -Wshadow -Wmissing-prototypes \
        -Wstrict-prototypes -Wpointer-arith -Wcast-qual
BUILD ?= build
BUSTED ?= /usr/bin/busted
LUACHECK ?= luacheck

SRC := csrc/sf_core.c csrc/lsf.c csrc/lsf_hold.c csrc/lsf_copy.c csrc/lsf_fast.c
HDR := csrc/sf_core.h csrc/lsf.h csrc/lsf_compat.h

lua_inc = $(if $(filter jit,$1),/usr/include/luajit-2.1,/usr/include/lua$1)
lua_bin = $(if $(filter jit,$1),luajit,lua$1)
MODULES := $(foreach v,$(LUA_VERSIONS),$(BUILD)/$v/singleflight/core.so)

# Debian packages: those the tests need, and those bench and demo add.
TEST_PKGS ?= build-essential lua5.1 liblua5.1-0-dev lua5.2 liblua5.2-dev \
             lua5.3 liblua5.3-dev lua5.4 liblua5.4-dev luajit2 \
             libluajit2-5.1-dev lua-busted lua-check luarocks valgrind \
             nginx libnginx-mod-http-lua lua-resty-core lua-cqueues \
             lua-copas lua-socket curl redis-server lua-nginx-redis \
             lua-resty-lrucache openssl redis-sentinel
BENCH_PKGS ?= golang-go golang-golang-x-sync-dev hyperfine wrk
DEMO_PKGS ?= wrk

all: build

# Each mk/*.mk adds its own targets, and the checks `make test` runs to
# CHECK_EXTRA.
CHECK_EXTRA :=
-include $(sort $(wildcard mk/*.mk))

.PHONY: all build test deps bench-deps check specs lint rockspec-check \
        demo demo-fleet bench clean

build: $(MODULES)

$(BUILD)/%/singleflight/core.so: $(SRC) $(HDR)
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(OPT) -fPIC -shared -I$(call lua_inc,$*) -Icsrc \
	  $(SRC) -o $@ -lpthread

deps:
	@sh tools/deps.sh $(TEST_PKGS)

bench-deps:
	@sh tools/deps.sh $(TEST_PKGS) $(BENCH_PKGS)

test: deps
	@$(MAKE) --no-print-directory check

check: build lint specs rockspec-check $(CHECK_EXTRA)
	@echo "check: every step passed; specs: $$(cat $(BUILD)/specs-summary)"
	@echo "specs: $$(cat $(BUILD)/specs-summary)"

specs: build
	@SPECS_SUMMARY=$(BUILD)/specs-summary sh tools/run-specs.sh "$(BUSTED)" $(LUA_VERSIONS)

lint:
	$(LUACHECK) $(wildcard lua spec bench tools *.lua)

rockspec-check:
	@sh tools/rockspec-check.sh

demo: deps build
	@sh tools/deps.sh $(DEMO_PKGS) || true
	@BUILD=$(BUILD) sh tools/demo.sh

demo-fleet: deps build
	@BUILD=$(BUILD) sh tools/demo_fleet.sh

bench: bench-deps build
	@sh bench/run.sh

clean:
	rm -rf $(BUILD)
