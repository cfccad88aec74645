# sanitize.mk: the specs and the C tests (stress, lifetime) under the
# sanitizers and valgrind, all part of `make check`. Each fails the build on
# any report.
#
#   make asan      specs (Lua 5.4) and C tests under ASan + UBSan
#   make tsan      thread specs (Lua 5.4) and C tests under TSan
#   make valgrind  specs (Lua 5.4, VALGRIND_SPECS) and C tests under memcheck
#   make sanitize  all three
#
# The module and sfthreads.so are built instrumented into $(BUILD)/asan/5.4
# and $(BUILD)/tsan/5.4; the interpreter is not instrumented, so the
# sanitizer's runtime is preloaded into lua5.4. gcc's runtimes (libasan,
# libubsan, libtsan) are used: SAN_CC picks the compiler.

CTEST_BUILD ?= $(BUILD)/ctest
SAN_CC ?= gcc
SAN_LUA ?= 5.4
SAN_WARN ?= $(WARN)
ASAN_CFLAGS ?= -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
               -fno-sanitize-recover=all
TSAN_CFLAGS ?= -O1 -g -fno-omit-frame-pointer -fsanitize=thread
ASAN_RT = $(shell $(SAN_CC) -print-file-name=libasan.so)
TSAN_RT = $(shell $(SAN_CC) -print-file-name=libtsan.so)
# TSan needs the classic address-space layout; setarch -R gives it where
# the kernel randomises mmap more than TSan's runtime expects.
NO_ASLR = $(shell setarch -R true >/dev/null 2>&1 && echo setarch -R)

ASAN_ENV = ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:abort_on_error=0:strict_string_checks=1 \
           UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
TSAN_ENV = TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
VALGRIND ?= valgrind
VALGRIND_FLAGS ?= -q --error-exitcode=99 --leak-check=full --show-leak-kinds=all \
                  --errors-for-leak-kinds=all --suppressions=ctest/valgrind.supp

# What runs under each tool. ASan: every spec. TSan: the specs that use
# threads (spec/2x). valgrind: every spec but those of the schedulers and
# OpenResty (spec/3x, spec/4x), whose waits are timed (valgrind runs Lua
# some 20 times slower) and whose event loops and servers are not this
# library's code.
ASAN_SPECS ?= spec
TSAN_SPECS ?= $(sort $(wildcard spec/2*_spec.lua))
VALGRIND_SPECS ?= $(filter-out spec/3% spec/4%,$(sort $(wildcard spec/*_spec.lua)))
SAN_STRESS_SECONDS ?= 2
VALGRIND_STRESS_SECONDS ?= 1

SAN_SPEC_ENV = SINGLEFLIGHT_LUA=lua$(SAN_LUA) SINGLEFLIGHT_LUA_VERSION=$(SAN_LUA)
SAN_BUSTED = lua$(SAN_LUA) $(BUSTED) -o utfTerminal

# busted on the ASan build, with the runtime preloaded, before the specs to
# run (asan-specs here, gc-torture-asan in gctorture.mk); asan-modules
# builds what it loads.
ASAN_MODULES = $(BUILD)/asan/$(SAN_LUA)/singleflight/core.so $(BUILD)/asan/$(SAN_LUA)/sfthreads.so
ASAN_BUSTED = env $(ASAN_ENV) $(SAN_SPEC_ENV) LD_PRELOAD="$(ASAN_RT)" \
              $(SAN_BUSTED) --cpath="$(BUILD)/asan/$(SAN_LUA)/?.so"

.PHONY: sanitize asan tsan valgrind asan-modules asan-specs asan-stress \
        asan-lifetime tsan-specs tsan-stress tsan-lifetime valgrind-specs \
        valgrind-stress valgrind-lifetime

sanitize: asan tsan valgrind
asan: asan-specs asan-stress asan-lifetime
tsan: tsan-specs tsan-stress tsan-lifetime
valgrind: valgrind-specs valgrind-stress valgrind-lifetime

# ---- instrumented builds ----

$(BUILD)/asan/$(SAN_LUA)/singleflight/core.so: $(SRC) $(HDR)
	@mkdir -p $(dir $@)
	$(SAN_CC) $(SAN_WARN) $(ASAN_CFLAGS) -fPIC -shared -I$(call lua_inc,$(SAN_LUA)) \
	  -Icsrc $(SRC) -o $@ -lpthread

$(BUILD)/asan/$(SAN_LUA)/sfthreads.so: ctest/sfthreads.c
	@mkdir -p $(dir $@)
	$(SAN_CC) $(SAN_WARN) $(ASAN_CFLAGS) -fPIC -shared -I$(call lua_inc,$(SAN_LUA)) \
	  $< -o $@ -lpthread -ldl

$(BUILD)/tsan/$(SAN_LUA)/singleflight/core.so: $(SRC) $(HDR)
	@mkdir -p $(dir $@)
	$(SAN_CC) $(SAN_WARN) $(TSAN_CFLAGS) -fPIC -shared -I$(call lua_inc,$(SAN_LUA)) \
	  -Icsrc $(SRC) -o $@ -lpthread

$(BUILD)/tsan/$(SAN_LUA)/sfthreads.so: ctest/sfthreads.c
	@mkdir -p $(dir $@)
	$(SAN_CC) $(SAN_WARN) $(TSAN_CFLAGS) -fPIC -shared -I$(call lua_inc,$(SAN_LUA)) \
	  $< -o $@ -lpthread -ldl

$(CTEST_BUILD)/stress-asan: ctest/stress.c csrc/sf_core.c csrc/sf_core.h
	@mkdir -p $(dir $@)
	$(SAN_CC) $(SAN_WARN) $(ASAN_CFLAGS) -Icsrc ctest/stress.c csrc/sf_core.c -o $@ -lpthread

$(CTEST_BUILD)/stress-tsan: ctest/stress.c csrc/sf_core.c csrc/sf_core.h
	@mkdir -p $(dir $@)
	$(SAN_CC) $(SAN_WARN) $(TSAN_CFLAGS) -Icsrc ctest/stress.c csrc/sf_core.c -o $@ -lpthread

$(CTEST_BUILD)/lifetime-asan: ctest/lifetime.c csrc/sf_core.c csrc/sf_core.h
	@mkdir -p $(dir $@)
	$(SAN_CC) $(SAN_WARN) $(ASAN_CFLAGS) -Icsrc ctest/lifetime.c csrc/sf_core.c -o $@ \
	  -lpthread $(LIFETIME_WRAP)

$(CTEST_BUILD)/lifetime-tsan: ctest/lifetime.c csrc/sf_core.c csrc/sf_core.h
	@mkdir -p $(dir $@)
	$(SAN_CC) $(SAN_WARN) $(TSAN_CFLAGS) -Icsrc ctest/lifetime.c csrc/sf_core.c -o $@ \
	  -lpthread $(LIFETIME_WRAP)

# ---- runs ----

asan-modules: $(ASAN_MODULES)

asan-specs: asan-modules
	@sh ctest/sanitized.sh "specs on Lua $(SAN_LUA) under ASan+UBSan" \
	  $(ASAN_BUSTED) $(ASAN_SPECS)

asan-stress: $(CTEST_BUILD)/stress-asan
	@sh ctest/sanitized.sh "stress test under ASan+UBSan" \
	  env $(ASAN_ENV) $(CTEST_BUILD)/stress-asan $(SAN_STRESS_SECONDS) $(STRESS_THREADS)

asan-lifetime: $(CTEST_BUILD)/lifetime-asan
	@sh ctest/sanitized.sh "lifetime test under ASan+UBSan" \
	  env $(ASAN_ENV) $(CTEST_BUILD)/lifetime-asan

tsan-specs: $(BUILD)/tsan/$(SAN_LUA)/singleflight/core.so $(BUILD)/tsan/$(SAN_LUA)/sfthreads.so
	@sh ctest/sanitized.sh "thread specs on Lua $(SAN_LUA) under TSan" \
	  env $(TSAN_ENV) $(SAN_SPEC_ENV) LD_PRELOAD="$(TSAN_RT)" $(NO_ASLR) \
	  $(SAN_BUSTED) --cpath="$(BUILD)/tsan/$(SAN_LUA)/?.so" $(TSAN_SPECS)

tsan-stress: $(CTEST_BUILD)/stress-tsan
	@sh ctest/sanitized.sh "stress test under TSan" \
	  env $(TSAN_ENV) $(NO_ASLR) $(CTEST_BUILD)/stress-tsan $(SAN_STRESS_SECONDS) $(STRESS_THREADS)

tsan-lifetime: $(CTEST_BUILD)/lifetime-tsan
	@sh ctest/sanitized.sh "lifetime test under TSan" \
	  env $(TSAN_ENV) $(NO_ASLR) $(CTEST_BUILD)/lifetime-tsan

valgrind-specs: $(BUILD)/$(SAN_LUA)/singleflight/core.so $(BUILD)/$(SAN_LUA)/sfthreads.so
	@sh ctest/sanitized.sh "specs on Lua $(SAN_LUA) under valgrind memcheck" \
	  env $(SAN_SPEC_ENV) $(VALGRIND) $(VALGRIND_FLAGS) \
	  $(SAN_BUSTED) --cpath="$(BUILD)/$(SAN_LUA)/?.so" $(VALGRIND_SPECS)

valgrind-stress: $(CTEST_BUILD)/stress
	@sh ctest/sanitized.sh "stress test under valgrind memcheck" \
	  $(VALGRIND) $(VALGRIND_FLAGS) $(CTEST_BUILD)/stress $(VALGRIND_STRESS_SECONDS) $(STRESS_THREADS)

valgrind-lifetime: $(CTEST_BUILD)/lifetime
	@sh ctest/sanitized.sh "lifetime test under valgrind memcheck" \
	  $(VALGRIND) $(VALGRIND_FLAGS) $(CTEST_BUILD)/lifetime

CHECK_EXTRA += sanitize
