# gctorture.mk: the whole spec suite a second time with the garbage
# collector at its most aggressive, so that finalizers run and unreachable
# objects are freed at any allocation, in Lua or in the C module. Part of
# `make check`.
#
#   make gc-torture        the three runs below
#   make gc-torture-5.4    the specs on Lua 5.4
#   make gc-torture-jit    the specs on LuaJIT, nginx's Lua included
#   make gc-torture-asan   the specs on Lua 5.4 under ASan+UBSan (the
#                          instrumented build of sanitize.mk)
#
# spec/gc_torture.lua sets the collector and says how; every Lua
# interpreter the run starts (busted, and the child processes of specs)
# runs it first through LUA_INIT, sfthreads.so applies the same to the
# states it makes, nginx_server.lua to nginx's. Under torture, the loops
# that are there to repeat run a tenth of their rounds (helpers.scale).
#
#   GC_TORTURE=full        a whole collection at every allocation check
#                          instead: far slower, for a few spec files, e.g.
#   make gc-torture-5.4 GC_TORTURE=full GC_TORTURE_SPECS=spec/01-call_spec.lua

GC_TORTURE ?= 1
GC_TORTURE_VERSIONS ?= 5.4 jit
GC_TORTURE_SPECS ?= spec
# A LUA_INIT_5_x would take LUA_INIT's place.
GC_TORTURE_ENV = -u LUA_INIT_5_1 -u LUA_INIT_5_2 -u LUA_INIT_5_3 -u LUA_INIT_5_4 \
                 SINGLEFLIGHT_GC_TORTURE=$(GC_TORTURE) \
                 LUA_INIT=@$(CURDIR)/spec/gc_torture.lua
lua_name = $(if $(filter jit,$1),LuaJIT,Lua $1)
GC_TORTURE_RUNS := $(GC_TORTURE_VERSIONS:%=gc-torture-%)

.PHONY: gc-torture gc-torture-asan $(GC_TORTURE_RUNS)

gc-torture: $(GC_TORTURE_RUNS) gc-torture-asan

$(GC_TORTURE_RUNS): gc-torture-%: build
	@sh ctest/sanitized.sh "specs on $(call lua_name,$*) under GC torture" \
	  env $(GC_TORTURE_ENV) SINGLEFLIGHT_LUA=$(call lua_bin,$*) \
	  SINGLEFLIGHT_LUA_VERSION=$* $(call lua_bin,$*) $(BUSTED) -o utfTerminal \
	  --cpath="$(BUILD)/$*/?.so" $(GC_TORTURE_SPECS)

gc-torture-asan: asan-modules build
	@sh ctest/sanitized.sh "specs on Lua $(SAN_LUA) under GC torture and ASan+UBSan" \
	  env $(GC_TORTURE_ENV) $(ASAN_BUSTED) $(GC_TORTURE_SPECS)

CHECK_EXTRA += gc-torture
