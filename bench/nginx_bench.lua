--- Across nginx workers: stampedes of N concurrent requests on one
-- key over 4 nginx workers, through a group over a lua_shared_dict and
-- through a group per worker, side by side, one round of each at a time.
--
--   luajit bench/nginx_bench.lua [scale]
--
-- Run from the repository root (bench/run.sh does it), under LuaJIT with
-- LuaSocket. Prints "<name> <value>" lines: per mode, the medians over the
-- rounds of the waiters' p50 and p99 latency over the backend's time (ms)
-- and of the executions per stampede. Prints nothing (and says why on
-- stderr) where nginx with the Lua module can't run.
package.path = "spec/?.lua;" .. package.path
local ns = require "nginx_server"

local scale = tonumber(arg[1] or "1") or 1
local smoke = scale < 0.1
local WORKERS, REQUESTS = 4, smoke and 40 or 200
local ROUNDS = smoke and 1 or 7
local BACKEND = 0.1

local found, why = ns.find()
if not found then
  io.stderr:write("bench: across nginx workers skipped: ", why, "\n")
  return
end

local function quantile(t, q)
  table.sort(t)
  return t[math.max(1, math.ceil(q * #t))]
end

local function median(t)
  table.sort(t)
  local n = #t
  if n % 2 == 1 then
    return t[(n + 1) / 2]
  end
  return (t[n / 2] + t[n / 2 + 1]) / 2
end

local server = assert(ns.start(300, {
  workers = WORKERS,
  http = [[
  lua_shared_dict bench_sf 10m;
]],
  init = 'package.path = "' .. found.root .. '/bench/?.lua;" .. package.path\n'
         .. '    bench_app = require "ngx_bench_app"',
  servers = [[
  server {
    listen 127.0.0.1:@PORT2@ reuseport;
    location = /b { content_by_lua_block { bench_app.content() } }
  }
]],
}))

local ok, err = pcall(function()
  local port = server.ports[2]
  local res = { shm = { p50 = {}, p99 = {}, execs = {} },
                worker = { p50 = {}, p99 = {}, execs = {} } }
  -- a warm-up round of each, not counted
  for round = 0, ROUNDS do
    local modes = round % 2 == 0 and { "shm", "worker" } or { "worker", "shm" }
    for _, mode in ipairs(modes) do
      local paths = {}
      for i = 1, REQUESTS do
        paths[i] = ("/b?mode=%s&key=%s%d&backend=%g"):format(mode, mode, round, BACKEND)
      end
      local overs, execs = {}, 0
      for _, a in ipairs(ns.batch(port, paths, 30)) do
        assert(a.status == 200, "status " .. tostring(a.status) .. ": " .. tostring(a.body))
        if a.fields.led == "true" then
          execs = execs + 1
        else
          overs[#overs + 1] = tonumber(a.fields.over_ms)
        end
      end
      if round > 0 and #overs > 0 then
        local r = res[mode]
        r.p50[#r.p50 + 1] = quantile(overs, 0.5)
        r.p99[#r.p99 + 1] = quantile(overs, 0.99)
        r.execs[#r.execs + 1] = execs
      end
    end
  end
  for _, mode in ipairs { "shm", "worker" } do
    local r = res[mode]
    print(("xworker_%s_p50_ms %.3f"):format(mode, median(r.p50)))
    print(("xworker_%s_p99_ms %.3f"):format(mode, median(r.p99)))
    print(("xworker_%s_execs %g"):format(mode, median(r.execs)))
  end
  print(("xworker_requests %d"):format(REQUESTS))
  print(("xworker_workers %d"):format(WORKERS))
end)
server.stop()
assert(ok, err)
