--- Watching cost: what a worker spends while its caller waits on another
-- worker's leader. nginx with 4 workers, a group over a lua_shared_dict,
-- one key whose fn lasts for the whole measure in one worker, and one
-- waiter in each of the other workers (ngx_watch_bench_app.lua). Each
-- watching worker's CPU time (utime + stime of /proc/<pid>/stat) over a
-- window of 10 s in which every waiter waits, and the same workers' CPU
-- time over 10 s with no call (the idle baseline), as % of a core.
--
--   luajit bench/nginx_watch_bench.lua [scale]
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
local WINDOW = smoke and 0.3 or 10 -- seconds of measure, idle and watching
local KEY = "watched"

local function read_cmd(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  return out
end

local HZ = assert(tonumber(read_cmd("getconf CLK_TCK")), "getconf CLK_TCK")

-- utime + stime of process `pid`, in clock ticks
local function ticks(pid)
  local f = assert(io.open("/proc/" .. pid .. "/stat", "r"))
  local line = f:read("*l")
  f:close()
  -- fields 3 on come after the command's name, in parentheses
  local fields = {}
  for x in line:match("%) (.*)$"):gmatch("%S+") do
    fields[#fields + 1] = x
  end
  return tonumber(fields[12]) + tonumber(fields[13]) -- fields 14 and 15
end

-- Every pid's ticks over `secs` seconds: { [pid] = % of a core }.
local function usage(pids, secs)
  local before, t0 = {}, socket.gettime()
  for _, pid in ipairs(pids) do
    before[pid] = ticks(pid)
  end
  socket.sleep(secs)
  local after = {}
  for _, pid in ipairs(pids) do
    after[pid] = ticks(pid)
  end
  local elapsed, pct = socket.gettime() - t0, {}
  for _, pid in ipairs(pids) do
    pct[pid] = (after[pid] - before[pid]) / HZ / elapsed * 100
  end
  return pct
end

harness.main("watching cost", "ngx_watch_bench_app", {
  workers = WORKERS,
  reuseport = true,
  dicts = { bench_sf = "10m", bench_book = "1m" },
}, function(server, port)
  local pids = server.workers()
  socket.sleep(smoke and 0.05 or 1) -- the workers' start-up, not counted
  local idle = usage(pids, WINDOW)

  local function state()
    local a = ns.get(port, "/state?key=" .. KEY, 10)
    assert(a.status == 200, "/state: status " .. tostring(a.status))
    local callers = {}
    for p in a.fields.callers:gmatch("%d+") do
      callers[#callers + 1] = tonumber(p)
    end
    return tonumber(a.fields.leader), callers
  end

  local conns = { ns.open(port, "/watch?key=" .. KEY) }
  local leader, callers
  ns.eventually(function()
    leader, callers = state()
    return leader ~= nil
  end, "the leader", 10)
  -- waiters, a few connections at a time, until every worker has one
  -- (a worker answers the connections after its first at once)
  ns.eventually(function()
    callers = select(2, state())
    if #callers == WORKERS then
      return true
    end
    for _ = 1, WORKERS do
      conns[#conns + 1] = ns.open(port, "/watch?key=" .. KEY)
    end
    return false
  end, "a waiter in every worker", 10)
  for _, pid in ipairs(callers) do -- the same workers as at the start?
    assert(idle[pid], "worker " .. pid .. " started after the idle measure")
  end
  local watching = usage(pids, WINDOW)
  ns.get(port, "/release?key=" .. KEY, 10)

  local waiters = 0
  for _, a in ipairs(ns.collect(conns, 30)) do
    assert(a.status == 200, "a caller: status " .. tostring(a.status)
           .. (a.timed_out and " (timed out)" or ""))
    if a.fields.role == "waiter" then
      assert(a.fields.value == "v", "a waiter got " .. tostring(a.fields.value))
      waiters = waiters + 1
    end
  end
  assert(waiters == WORKERS - 1, ("%d waiters answered, not %d"):format(waiters, WORKERS - 1))

  local worst, worst_idle = 0, 0
  for _, pid in ipairs(pids) do
    if pid ~= leader then
      worst = math.max(worst, watching[pid])
      worst_idle = math.max(worst_idle, idle[pid])
    end
  end
  print(("watch_worst_pct %.3f"):format(worst))
  print(("watch_idle_pct %.3f"):format(worst_idle))
  print(("watch_leader_pct %.3f"):format(watching[leader]))
  print(("watch_secs %g"):format(WINDOW))
  print(("watch_workers %d"):format(WORKERS))
  print(("watch_clk_tck %d"):format(HZ))
end)
