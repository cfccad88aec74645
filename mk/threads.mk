# threads.mk: the test-only code under ctest/, none of it installed.
#
#   sfthreads.so   a Lua module that runs chunks in OS threads, each in its
#                  own lua_State, for the specs (spec/2x-*_spec.lua); built
#                  next to singleflight.core for every Lua version
#   stress         a C stress test of the core alone (ctest/stress.c)
#   lifetime       a deterministic C test of the core's lifetime protocol
#                  (ctest/lifetime.c), its allocations counted through
#                  the linker's --wrap
#
#   make stress    runs it: STRESS_SECONDS, STRESS_THREADS, STRESS_SEED
#   make lifetime  runs it

# The fragments are read before the Makefile's first rule: keep `make`
# meaning `make all`.

STRESS_SECONDS ?= 3
STRESS_THREADS ?= 8
THREADS_MODULES := $(foreach v,$(LUA_VERSIONS),$(BUILD)/$v/sfthreads.so)
CTEST_BUILD ?= $(BUILD)/ctest

# lifetime.c counts (and fails on demand) the core's allocations.
LIFETIME_WRAP = -Wl,--wrap=malloc,--wrap=calloc,--wrap=aligned_alloc,--wrap=free

.PHONY: test-helpers stress lifetime

test-helpers: $(THREADS_MODULES)
specs: $(THREADS_MODULES)
# `make` builds them too, so that a bare `busted` after it finds them in
# build/<v>/ (see .busted).
build: $(THREADS_MODULES)

$(BUILD)/%/sfthreads.so: ctest/sfthreads.c
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(OPT) -fPIC -shared -I$(call lua_inc,$*) $< -o $@ -lpthread -ldl

$(CTEST_BUILD)/stress: ctest/stress.c csrc/sf_core.c csrc/sf_core.h
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(OPT) -Icsrc ctest/stress.c csrc/sf_core.c -o $@ -lpthread

stress: $(CTEST_BUILD)/stress
	@$(CTEST_BUILD)/stress $(STRESS_SECONDS) $(STRESS_THREADS)

$(CTEST_BUILD)/lifetime: ctest/lifetime.c csrc/sf_core.c csrc/sf_core.h
	@mkdir -p $(dir $@)
	$(CC) $(WARN) $(OPT) -Icsrc ctest/lifetime.c csrc/sf_core.c -o $@ -lpthread $(LIFETIME_WRAP)

lifetime: $(CTEST_BUILD)/lifetime
	@$(CTEST_BUILD)/lifetime

CHECK_EXTRA += stress lifetime
