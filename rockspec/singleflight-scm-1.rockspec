rockspec_format = "3.0"
package = "singleflight"
version = "scm-1"
source = {
  url = "git+https://example.invalid/singleflight.git",
}
description = {
  summary = "Duplicate-call suppression for Lua and OpenResty, with a C core",
  detailed = [[
While a call for a key is in flight, every other caller of that key waits
for it and shares its result or its error, as Go's singleflight does for
goroutines. Works on Lua 5.1 to 5.4 and LuaJIT (OpenResty included), for one
Lua state or for every state in the process.
]],
  license = "MIT",
  labels = { "cache", "concurrency", "openresty" },
}
dependencies = {
  "lua >= 5.1, < 5.5",
}
build = {
  type = "builtin",
  modules = {
    ["singleflight"] = "lua/singleflight/init.lua",
    ["singleflight.backends"] = "lua/singleflight/backends.lua",
    ["singleflight.codec"] = "lua/singleflight/codec.lua",
    ["singleflight.flow"] = "lua/singleflight/flow.lua",
    ["singleflight.flights"] = "lua/singleflight/flights.lua",
    ["singleflight.liveness"] = "lua/singleflight/liveness.lua",
    ["singleflight.future"] = "lua/singleflight/future.lua",
    ["singleflight.options"] = "lua/singleflight/options.lua",
    ["singleflight.panic"] = "lua/singleflight/panic.lua",
    ["singleflight.runner"] = "lua/singleflight/runner.lua",
    ["singleflight.redis"] = "lua/singleflight/redis.lua",
    ["singleflight.shm"] = "lua/singleflight/shm.lua",
    ["singleflight.backend.ngx"] = "lua/singleflight/backend/ngx.lua",
    ["singleflight.backend.cqueues"] = "lua/singleflight/backend/cqueues.lua",
    ["singleflight.backend.copas"] = "lua/singleflight/backend/copas.lua",
    ["singleflight.core"] = {
      sources = { "csrc/sf_core.c", "csrc/lsf.c", "csrc/lsf_hold.c",
                  "csrc/lsf_copy.c", "csrc/lsf_fast.c" },
      incdirs = { "csrc" },
      libraries = { "pthread" },
    },
  },
}
