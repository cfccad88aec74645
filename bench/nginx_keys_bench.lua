--- 1000 keys x 4 workers: 1000 keys in flight for 3 s each, 10 callers per
-- key in each of 4 nginx workers (40 000 callers), through a group over a
-- lua_shared_dict. The callers are light threads that each worker spawns
-- at the same instant (ngx_keys_bench_app.lua): a socket per caller would
-- measure the client. Counts the executions (one per key is the promise)
-- and the worst lag of the workers' event loops meanwhile (a 10 ms timer
-- set again each time it fires: how late it fires).
--
--   luajit bench/nginx_keys_bench.lua [scale]
--
-- Run from the repository root (bench/run.sh does it), under LuaJIT with
-- LuaSocket. Prints "<name> <value>" lines. Prints nothing (and says why
-- on stderr) where nginx with the Lua module can't run.
package.path = "bench/?.lua;" .. package.path
local harness = require "nginx_harness"
local socket = require "socket"
local ns = harness.ns

local _, smoke = harness.scale()
local WORKERS = 4
local KEYS, CALLERS = smoke and 10 or 1000, smoke and 2 or 10
local SECS = smoke and 0.3 or 3

harness.main("1000 keys x 4 workers", "ngx_keys_bench_app", {
  workers = WORKERS,
  dicts = { bench_sf = "20m", bench_book = "1m" },
  init_worker = 'require("ngx_keys_bench_app").init_worker()',
}, function(_, port)
  socket.sleep(smoke and 0.1 or 1) -- every worker's watch timer runs
  local go = ns.get(port, ("/go?keys=%d&callers=%d&secs=%g"):format(KEYS, CALLERS, SECS), 10)
  assert(go.status == 200, "/go: status " .. tostring(go.status))
  local gen = go.fields.gen
  -- every worker's tally, or what there is after a while (callers that
  -- are never answered show in keys_answered)
  local status
  local deadline = socket.gettime() + SECS * 10 + 30
  repeat
    socket.sleep(0.1)
    status = ns.get(port, "/status?gen=" .. gen, 10).fields
    local n = 0
    for k in pairs(status) do
      if k:match("^done_") then
        n = n + 1
      end
    end
  until n == WORKERS or socket.gettime() > deadline
  local answered, errors, lag, spawn, took = 0, 0, 0, 0, 0
  for k, v in pairs(status) do
    if k:match("^done_") then
      local t = {}
      for name, x in v:gmatch("(%w+)=(%S+)") do
        t[name] = tonumber(x)
      end
      answered, errors = answered + t.answered, errors + t.errors
      lag, spawn = math.max(lag, t.lag), math.max(spawn, t.spawn)
      took = math.max(took, t.took)
    end
  end
  print(("keys_execs %d"):format(tonumber(status.execs)))
  print(("keys_lag_ms %.3f"):format(lag * 1000))
  print(("keys_answered %d"):format(answered))
  print(("keys_errors %d"):format(errors))
  print(("keys_callers %d"):format(KEYS * CALLERS * WORKERS))
  print(("keys_keys %d"):format(KEYS))
  print(("keys_workers %d"):format(WORKERS))
  print(("keys_secs %g"):format(SECS))
  print(("keys_spawn_ms %.3f"):format(spawn * 1000))
  print(("keys_took_s %.3f"):format(took))
end)
