--- A big heap (the host never stalls): one nginx worker whose Lua heap
-- holds millions of small tables, slow calls with waiters, and an
-- unrelated location (/ping) requested one after another all along, every
-- 10 ms. The slow calls go through singleflight and through a lean
-- plain-Lua singleflight on ngx.semaphore (ngx_heap_bench_app.lua), in
-- rounds that alternate (ABBA) on the same heap in the same worker.
--
--   luajit bench/nginx_heap_bench.lua [scale]
--
-- Run from the repository root (bench/run.sh does it), under LuaJIT with
-- LuaSocket. Prints "<name> <value>" lines: per mode, /ping's worst and
-- p99 latency (ms) over its rounds, and the executions per round; the
-- heap's size. Prints nothing (and says why on stderr) where nginx with
-- the Lua module can't run.
package.path = "bench/?.lua;" .. package.path
local harness = require "nginx_harness"
local socket = require "socket"
local ns = harness.ns

local _, smoke = harness.scale()
local TABLES = smoke and 2000 or 5000000
local KEYS, WAITERS = smoke and 2 or 20, 2
local SECS = smoke and 0.2 or 3 -- each fn's wait on its backend
local TAIL = smoke and 0.1 or 1 -- /ping goes on this long after the calls
local ORDER = smoke and { "sf", "plain" } or { "sf", "plain", "plain", "sf" }

-- /ping, one request after another with 10 ms between, until `until_`;
-- adds each latency (ms) to `into`.
local function pings(port, until_, into)
  repeat
    local t0 = socket.gettime()
    local a = ns.get(port, "/ping", 30)
    assert(a.body and a.body:match("pong"), "/ping: " .. tostring(a.status))
    into[#into + 1] = (socket.gettime() - t0) * 1000
    socket.sleep(0.01)
  until socket.gettime() >= until_
end

local function field(port, path, name)
  local a = ns.get(port, path, 30)
  assert(a.status == 200, path .. ": status " .. tostring(a.status))
  return a.fields[name]
end

harness.main("a big heap", "ngx_heap_bench_app", {}, function(_, port)
  local kb = tonumber(field(port, "/grow?n=" .. TABLES, "kb"))
  pings(port, socket.gettime() + 0.2, {}) -- warm-up, not counted
  local lat, execs = { sf = {}, plain = {} }, { sf = {}, plain = {} }
  for round, mode in ipairs(ORDER) do
    local before = tonumber(field(port, "/execs?mode=" .. mode, "n"))
    local conns = {}
    for k = 1, KEYS do
      for _ = 0, WAITERS do
        conns[#conns + 1] = ns.open(port, ("/slow?mode=%s&key=r%dk%d&secs=%g")
                                          :format(mode, round, k, SECS))
      end
    end
    pings(port, socket.gettime() + SECS + TAIL, lat[mode])
    for _, a in ipairs(ns.collect(conns, SECS + 30)) do
      assert(a.fields.value == "v", mode .. " caller: status " .. tostring(a.status)
             .. (a.timed_out and " (timed out)" or ""))
    end
    local after = tonumber(field(port, "/execs?mode=" .. mode, "n"))
    execs[mode][#execs[mode] + 1] = after - before
  end
  for _, mode in ipairs { "sf", "plain" } do
    local worst = math.max(unpack(lat[mode]))
    print(("heap_%s_worst_ms %.3f"):format(mode, worst))
    print(("heap_%s_p99_ms %.3f"):format(mode, harness.quantile(lat[mode], 0.99)))
    print(("heap_%s_pings %d"):format(mode, #lat[mode]))
    print(("heap_%s_execs %g"):format(mode, math.max(unpack(execs[mode]))))
  end
  print(("heap_mb %.1f"):format(kb / 1024))
  print(("heap_tables %d"):format(TABLES))
  print(("heap_keys %d"):format(KEYS))
  print(("heap_waiters %d"):format(WAITERS))
  print(("heap_secs %g"):format(SECS))
end)
