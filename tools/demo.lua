-- demo.lua: a stampede of 1000 coroutines on one missing cache entry.
-- Every caller asks for the same key at once; the "backend" (a function that
-- takes a few scheduler rounds, as a network call would) runs once.
local singleflight = require "singleflight"

local CALLERS = tonumber(os.getenv("CALLERS")) or 1000
local group = singleflight.new { backend = "coroutine" }
local backend_calls = 0

local function fetch(key)
  backend_calls = backend_calls + 1
  for _ = 1, 10 do coroutine.yield() end -- "network" time
  return { key = key, value = "fresh " .. key }
end

local function run(label, get)
  backend_calls = 0
  local cos, answers = {}, 0
  for i = 1, CALLERS do
    cos[i] = coroutine.create(function()
      local v = get("user:42")
      if v and v.value == "fresh user:42" then answers = answers + 1 end
    end)
  end
  local t0 = os.clock()
  local alive = true
  while alive do
    alive = false
    for i = 1, CALLERS do
      if coroutine.status(cos[i]) == "suspended" then
        assert(coroutine.resume(cos[i]))
        alive = alive or coroutine.status(cos[i]) ~= "dead"
      end
    end
  end
  local ms = (os.clock() - t0) * 1000
  print(string.format("%-18s callers %5d   answered %5d   backend calls %5d   %7.2f ms",
                      label, CALLERS, answers, backend_calls, ms))
end

print(("singleflight stampede on %s: %d coroutines ask for one key at once\n")
      :format(rawget(_G, "jit") and jit.version or _VERSION, CALLERS))
run("without", fetch)
run("with singleflight", function(key) return group:call(key, fetch, key) end)
local st = group:stats()
print(("\nstats: calls %d, executions %d, shared %d"):format(st.calls, st.executions, st.shared))
