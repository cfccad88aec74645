--- A loader's cache misses across nginx workers, as OpenResty users run
-- one: nginx with 4 workers, ids drawn from a Zipf-like law (s = 1.1 over
-- 100 000 ids, bench/zipf_wrk.lua) by wrk with 200 connections, a
-- per-worker lua-resty-lrucache (TTL 2 s) in front, and on a miss
-- g:call(id, origin) with a 20 ms origin (ngx_zipf_bench_app.lua); through
-- a group per worker and through a group over a lua_shared_dict, in
-- alternating rounds of the same nginx. Per mode: the workers' CPU time
-- (utime + stime of /proc/<pid>/stat over each measured round) per
-- request, wrk's p99.9 latency, requests/s, the origin's calls per
-- request, and how often an origin call began while another of the same
-- id ran (never, with shm); and the ratios shm / a group per worker of the
-- CPU per request and of p99.9: the median over the pairs of rounds run
-- one after the other. Each round is measured after a warm-up of its
-- own that fills its cache (the entries of its last round have expired).
--
--   luajit bench/nginx_zipf_bench.lua [scale]
--
-- Run from the repository root (bench/run.sh does it), under LuaJIT with
-- LuaSocket, with Debian's wrk. Prints "<name> <value>" lines. Prints
-- nothing (and says why on stderr) where nginx with the Lua module or wrk
-- can't run. A smoke run (scale < 0.1) loads each mode for a second.
package.path = "bench/?.lua;" .. package.path
local harness = require "nginx_harness"
local ns = harness.ns

local _, smoke = harness.scale()
local WORKERS, CONNS, THREADS = 4, 200, 2
local WARM, SECS = smoke and 0 or 2, smoke and 1 or 4
-- ABBA twice: each mode as often first as second, and the machine's other
-- load spread over both
local ROUNDS = smoke and { "shm", "worker" }
               or { "shm", "worker", "worker", "shm", "worker", "shm", "shm", "worker" }

local function output(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  return out
end

if not output("command -v wrk"):match("wrk") then
  io.stderr:write("bench: a loader's cache misses skipped: wrk is not installed\n")
  return
end

local HZ = assert(tonumber(output("getconf CLK_TCK")), "getconf CLK_TCK")

-- The CPU time of the processes pids, in clock ticks: utime and stime,
-- the 14th and 15th fields of /proc/<pid>/stat (counted from the pid;
-- the name, in parentheses, may hold spaces).
local function cpu_ticks(pids)
  local sum = 0
  for _, pid in ipairs(pids) do
    local f = assert(io.open(("/proc/%d/stat"):format(pid)))
    local rest = f:read("*a"):match("%)%s+(.*)")
    f:close()
    local n = 2 -- the fields before rest
    for field in rest:gmatch("%S+") do
      n = n + 1
      if n == 14 or n == 15 then
        sum = sum + tonumber(field)
      end
    end
  end
  return sum
end

-- wrk against url for secs seconds: its "zipf" lines, as a table.
local function load(url, secs)
  local out = output(("wrk -t%d -c%d -d%ds --timeout 10s -s bench/zipf_wrk.lua %s")
                     :format(THREADS, CONNS, secs, url))
  local r = {}
  for name, value in out:gmatch("zipf (%S+) (%S+)") do
    r[name] = tonumber(value)
  end
  assert(r.requests, "wrk said: " .. out)
  return r
end

local function median(t)
  table.sort(t)
  local n = #t
  return n % 2 == 1 and t[(n + 1) / 2] or (t[n / 2] + t[n / 2 + 1]) / 2
end

harness.main("a loader's cache misses", "ngx_zipf_bench_app", {
  workers = WORKERS,
  reuseport = true,
  dicts = { sf = "20m", bench_book = "10m" },
}, function(server, port)
  local pids = server.workers()
  local function book(name) -- a count of /book
    local a = ns.get(port, "/book", 10)
    assert(a.status == 200, "/book: status " .. tostring(a.status))
    return tonumber(a.fields[name])
  end
  local res = {}
  for _, mode in ipairs { "shm", "worker" } do
    res[mode] = { ticks = 0, requests = 0, secs = 0, errors = 0, calls = 0, overlaps = 0,
                  p999 = {}, cpu = {} }
  end
  local base = "http://127.0.0.1:" .. port .. "/"
  for _, mode in ipairs(ROUNDS) do
    if WARM > 0 then
      load(base .. mode, WARM)
    end
    local c0, o0, t0 = book(mode .. "_calls"), book(mode .. "_overlaps"), cpu_ticks(pids)
    local w = load(base .. mode, SECS)
    local t1 = cpu_ticks(pids)
    local r = res[mode]
    r.ticks = r.ticks + t1 - t0
    r.requests, r.secs = r.requests + w.requests, r.secs + w.secs
    r.errors = r.errors + w.errors
    r.calls = r.calls + book(mode .. "_calls") - c0
    r.overlaps = r.overlaps + book(mode .. "_overlaps") - o0
    r.p999[#r.p999 + 1] = w.p999_ms
    r.cpu[#r.cpu + 1] = (t1 - t0) / w.requests
  end
  -- the ratios of each pair of rounds side by side (ROUNDS pairs them),
  -- then their median: a burst of the machine's other load spoils one pair
  local function paired(field)
    local a, b, q = res.shm[field], res.worker[field], {}
    for i = 1, math.min(#a, #b) do
      q[i] = a[i] / b[i]
    end
    return median(q)
  end
  -- the dict holds in-flight state only: nothing, a while after the load
  local left
  ns.eventually(function()
    left = book("inflight")
    return left == 0 or smoke
  end, "an empty dict", 10)
  for _, mode in ipairs { "shm", "worker" } do
    local r, p = res[mode], 0
    for _, x in ipairs(r.p999) do
      p = p + x / #r.p999
    end
    print(("zipf_%s_cpu_us %.3f"):format(mode, r.ticks / HZ * 1e6 / r.requests))
    print(("zipf_%s_p999_ms %.3f"):format(mode, p))
    print(("zipf_%s_rps %.1f"):format(mode, r.requests / r.secs))
    print(("zipf_%s_origin_pct %.3f"):format(mode, r.calls / r.requests * 100))
    print(("zipf_%s_overlaps %d"):format(mode, r.overlaps))
    print(("zipf_%s_errors %d"):format(mode, r.errors))
  end
  print(("zipf_cpu_ratio %.4f"):format(paired("cpu")))
  print(("zipf_p999_ratio %.4f"):format(paired("p999")))
  print(("zipf_inflight_left %d"):format(left))
  print(("zipf_conns %d"):format(CONNS))
  print(("zipf_workers %d"):format(WORKERS))
  print(("zipf_secs %d"):format(SECS * #ROUNDS / 2))
end)
