--- The Lua benchmarks: g:call against pcall and a plain-Lua singleflight.
--
--   lua bench/lua_bench.lua speed|contention|memory|floor [scale]
--
-- Run from the repository root with package.path and package.cpath set to
-- lua/ and build/<version>/ (bench/run.sh does it). Prints one line per
-- measurement, "<name> <value>"; timings are medians of several rounds,
-- each round measuring the contenders side by side.

local singleflight = require "singleflight"
local plain = require "plain"
local floor_flight = require "floor_flight"

local clock = os.clock
local co_create, co_resume, co_status, co_yield =
      coroutine.create, coroutine.resume, coroutine.status, coroutine.yield
local fmt = string.format

local mode = arg[1] or "speed"
local scale = tonumber(arg[2] or "1")
assert(scale and scale > 0, "scale must be a positive number")

-- Lua 5.1 (not LuaJIT) cannot yield across pcall: plain's leader can't yield.
local PLAIN_YIELDS = not (_VERSION == "Lua 5.1" and not rawget(_G, "jit"))

local function scaled(n, min)
  local s = math.floor(n * scale)
  return s < (min or 1) and (min or 1) or s
end

local function median(t)
  table.sort(t)
  local n = #t
  if n % 2 == 1 then
    return t[(n + 1) / 2]
  end
  return (t[n / 2] + t[n / 2 + 1]) / 2
end

local function out(name, value)
  if type(value) == "number" then
    print(fmt("%s %.6g", name, value))
  else
    print(fmt("%s %s", name, tostring(value)))
  end
end

-- Runs the coroutines round-robin until all are dead; raises on the first
-- error or if they are still alive after `limit` rounds.
local function run_all(cos, limit)
  local rounds = 0
  repeat
    local alive = false
    rounds = rounds + 1
    for i = 1, #cos do
      local co = cos[i]
      if co_status(co) == "suspended" then
        local ok, e = co_resume(co)
        if not ok then
          error(e, 0)
        end
        alive = alive or co_status(co) ~= "dead"
      end
    end
  until not alive or rounds >= limit
  assert(rounds < limit, "coroutines still alive after " .. limit .. " rounds")
  return rounds
end

---------------------------------------------------------------------------
-- Speed

-- The work (fn) returns at once. It counts its runs, so that each
-- benchmark can check that fn ran on every call. On LuaJIT it also calls
-- gcinfo(), a builtin the JIT does not compile: real work (I/O) is opaque
-- to the trace compiler, and with an fn it can see through, LuaJIT sinks
-- the plain singleflight's table and its stores, leaving an empty loop
-- (0.8 ns) that measures no singleflight at all.
local ran = { n = 0 }
local OPAQUE = rawget(_G, "jit") and "gcinfo()" or ""

-- Each contender gets a loop and an fn of its own, compiled from source,
-- so that LuaJIT's traces (and blacklisting) of one are not shared with,
-- or spoiled by, another's: timed_loop(body) -> function(g, n) -> ns/op.
local loadstring = rawget(_G, "loadstring") or load
local function timed_loop(body)
  return assert(loadstring([[
    local ran = ...
    local clock, pcall, gcinfo = os.clock, pcall, rawget(_G, "gcinfo")
    local running = coroutine.running
    local function fn()
      ]] .. OPAQUE .. [[

      ran.n = ran.n + 1
      return true
    end
    return function(g, n)
      local t = clock()
      for _ = 1, n do
        ]] .. body .. [[

      end
      return (clock() - t) / n * 1e9
    end]]))(ran)
end

local ns_call = timed_loop('g:call("key", fn)')
local ns_plain = timed_loop('g:call("key", fn)')
local ns_pcall = timed_loop('pcall(fn)')
local ns_call_in = timed_loop('g:call("key", fn)') -- run inside a coroutine
-- LuaJIT's floor (bench/floor_jit.lua): coroutine.running, then the core
local ns_running = timed_loop('running(); pcall(fn)')
local ns_floor = timed_loop('g:call("key", fn)')
local JIT = rawget(_G, "jit") ~= nil

local function in_coroutine(f, ...)
  return coroutine.wrap(f)(...)
end

-- Uncontended: one key, nobody waiting, fn returns at once. The loops run
-- in the main coroutine; call_co_ns is g:call inside a coroutine (on 5.4
-- its leader frame has a to-be-closed slot the main thread goes without).
local function uncontended()
  local n, rounds = scaled(2000000, 100), 7
  local g, p = singleflight.new(), plain.new()
  local tc, tp, tq, tco = {}, {}, {}, {}
  local warm = math.floor(n / 10)
  ns_call(g, warm) -- warm up (and let LuaJIT compile)
  ns_plain(p, warm)
  ns_pcall(nil, warm)
  in_coroutine(ns_call_in, g, warm)
  ran.n = 0
  for r = 1, rounds do
    tc[r] = ns_call(g, n)
    tp[r] = ns_plain(p, n)
    tq[r] = ns_pcall(nil, n)
    tco[r] = in_coroutine(ns_call_in, g, n)
  end
  assert(ran.n == 4 * n * rounds, "fn did not run on every call")
  assert(g:stats().executions == 2 * (warm + n * rounds), "g:call did not lead every call")
  out("call_ns", median(tc))
  out("plain_ns", median(tp))
  out("pcall_ns", median(tq))
  out("call_co_ns", median(tco))
  if JIT then -- the floor, side by side with g:call again
    local fg = require("floor_jit").new()
    local tr, tf, tg = {}, {}, {}
    ns_running(nil, warm)
    ns_floor(fg, warm)
    for r = 1, rounds do
      tr[r] = ns_running(nil, n)
      tf[r] = ns_floor(fg, n)
      tg[r] = ns_call(g, n)
    end
    out("floor_running_ns", median(tr))
    out("floor_core_ns", median(tf))
    out("floor_call_ns", median(tg))
  end
end

-- Uncontended, with an fn that yields once, as every cosocket call does
-- (LuaJIT compiles a trivial fn, and plain Lua's flow around it, away):
-- one coroutine makes n calls of one key, nobody else calls, the driver
-- resumes it until it is done. Returns ns per call, resume included.
local function yielding_once(g, n)
  local function fn()
    co_yield()
    return true
  end
  local co = co_create(function()
    for _ = 1, n do
      g:call("key", fn)
    end
  end)
  local t = clock()
  repeat
    local ok, e = co_resume(co)
    if not ok then
      error(e, 0)
    end
  until co_status(co) == "dead"
  return (clock() - t) / n * 1e9
end

local function uncontended_yielding()
  local n, rounds = scaled(300000, 100), 7
  local g, p = singleflight.new { backend = "coroutine" }, plain.new()
  local tc, tp = {}, {}
  yielding_once(g, math.floor(n / 10)) -- warm up
  if PLAIN_YIELDS then
    yielding_once(p, math.floor(n / 10))
  end
  for r = 1, rounds do
    tc[r] = yielding_once(g, n)
    if PLAIN_YIELDS then
      tp[r] = yielding_once(p, n)
    end
  end
  local st = g:stats()
  assert(st.executions == st.calls and st.shared == 0, "every call led, alone")
  out("yield_call_ns", median(tc))
  if PLAIN_YIELDS then
    out("yield_plain_ns", median(tp))
  end
end

-- Same key under contention: `ncos` coroutines each make `calls` calls of
-- one key; fn yields once, so the callers of a round share one execution.
-- Returns ns per call (scheduler included) and executions.
local function contended(g, ncos, calls)
  local execs = 0
  local function fn()
    execs = execs + 1
    co_yield()
    return true
  end
  local cos = {}
  for i = 1, ncos do
    cos[i] = co_create(function()
      for _ = 1, calls do
        local v = g:call("key", fn)
        assert(v == true)
      end
    end)
  end
  local t = clock()
  run_all(cos, calls * 4 + 10)
  return (clock() - t) / (ncos * calls) * 1e9, execs
end

local function contention()
  local ncos, calls, rounds = 100, scaled(2000, 5), 5
  local tc, tp, tf = {}, {}, {}
  local ec, ep, ef
  for r = 1, rounds do
    tc[r], ec = contended(singleflight.new { backend = "coroutine" }, ncos, calls)
    if PLAIN_YIELDS then
      tp[r], ep = contended(plain.new(), ncos, calls)
      tf[r], ef = contended(floor_flight.new(), ncos, calls)
    end
  end
  out("contended_call_ns", median(tc))
  out("contended_call_execs", ec)
  out("contended_calls", ncos * calls)
  if PLAIN_YIELDS then
    out("contended_plain_ns", median(tp))
    out("contended_plain_execs", ep)
    out("contended_floor_ns", median(tf))
    assert(ef == ep, "the floor made as many executions as plain")
  end
end

-- A stampede: `n` coroutines ask for one key at once; fn takes 10
-- scheduler rounds, as a network call would. Returns ms and executions.
local function stampede_once(g, n)
  local execs = 0
  local function fetch()
    execs = execs + 1
    for _ = 1, 10 do
      co_yield()
    end
    return "fresh"
  end
  local cos, answers = {}, 0
  for i = 1, n do
    cos[i] = co_create(function()
      if g:call("user:42", fetch) == "fresh" then
        answers = answers + 1
      end
    end)
  end
  local t = clock()
  run_all(cos, 1000)
  assert(answers == n, "every caller gets the result")
  return (clock() - t) * 1e3, execs
end

local function stampede()
  local n, rounds = 1000, 5
  local tc, tp, tf = {}, {}, {}
  local ec, ep, ef
  for r = 1, rounds do
    tc[r], ec = stampede_once(singleflight.new { backend = "coroutine" }, n)
    if PLAIN_YIELDS then
      tp[r], ep = stampede_once(plain.new(), n)
      tf[r], ef = stampede_once(floor_flight.new(), n)
    end
  end
  out("stampede_callers", n)
  out("stampede_execs", ec)
  out("stampede_ms", median(tc))
  if PLAIN_YIELDS then
    out("stampede_plain_execs", ep)
    out("stampede_plain_ms", median(tp))
    out("stampede_floor_ms", median(tf))
    assert(ef == 1, "the floor made one execution")
  end
end

---------------------------------------------------------------------------
-- Floor: what a C g:call costs at the least, step by step (bench/floor.c,
-- Lua 5.3 and later), against pcall(fn) and g:call, side by side.

local function floor_steps()
  local floor = require "floor"
  local steps = { "pcallk", "group", "args", "thread", "core" }
  local loops, times = {}, {}
  for i, m in ipairs(steps) do
    loops[i] = timed_loop(("g:%s(\"key\", fn)"):format(m))
    times[i] = {}
  end
  local n, rounds = scaled(2000000, 100), 7
  local g, fg = singleflight.new(), floor.new()
  local tq, tc = {}, {}
  ns_pcall(nil, n / 10)
  ns_call(g, n / 10)
  for i = 1, #steps do
    loops[i](fg, n / 10)
  end
  for r = 1, rounds do
    tq[r] = ns_pcall(nil, n)
    for i = 1, #steps do
      times[i][r] = loops[i](fg, n)
    end
    tc[r] = ns_call(g, n)
  end
  out("floor_pcall_ns", median(tq))
  for i, m in ipairs(steps) do
    out("floor_" .. m .. "_ns", median(times[i]))
  end
  out("floor_call_ns", median(tc))
end

---------------------------------------------------------------------------
-- Memory

local function rss_kb()
  local f = io.open("/proc/self/status")
  if not f then
    return 0
  end
  local s = f:read("*a")
  f:close()
  return tonumber(s:match("VmRSS:%s*(%d+)")) or 0
end

local function settle()
  collectgarbage("collect")
  collectgarbage("collect")
  return collectgarbage("count"), rss_kb()
end

-- Memory over many calls: the Lua heap and the process' resident set after
-- a full collection, before and after.
local function growth()
  local n = scaled(10000000, 1000)
  local g = singleflight.new()
  ns_call(g, 10000)
  local lua0, rss0 = settle()
  ns_call(g, n)
  local lua1, rss1 = settle()
  assert(g:stats().calls >= n)
  out("growth_calls", n)
  out("growth_lua_kb", lua1 - lua0)
  out("growth_rss_kb", rss1 - rss0)
end

-- Lua heap bytes per in-flight call: n coroutines suspended inside fn
-- called through a singleflight, less n coroutines suspended inside fn
-- called directly. body(fn) makes a coroutine's body: function(key).
local function suspended_heap(n, keys, body)
  local function fn()
    co_yield()
    return true
  end
  collectgarbage("collect")
  local cos = {}
  local before = collectgarbage("count")
  collectgarbage("stop")
  for i = 1, n do
    local co = co_create(body(fn))
    cos[i] = co
    assert(co_resume(co, keys[i]))
  end
  local bytes = (collectgarbage("count") - before) * 1024
  collectgarbage("restart")
  for i = 1, n do -- let them finish: no call left in flight
    assert(co_resume(cos[i]))
    assert(co_status(cos[i]) == "dead")
  end
  return bytes / n
end

local function inflight()
  local n = scaled(100000, 100)
  local keys = {}
  for i = 1, n do
    keys[i] = fmt("%08x", i) -- 8 bytes
  end
  local g = singleflight.new { backend = "coroutine" }
  local p = plain.new()
  local base = suspended_heap(n, keys, function(fn)
    return function(k) return fn(k) end
  end)
  local sf = suspended_heap(n, keys, function(fn)
    return function(k) return g:call(k, fn) end
  end)
  -- the floor: what holding a leading coroutine costs at the least, its
  -- guard (the finalized holder that sees the coroutine go away)
  local own_guard = singleflight._core.own_guard
  local guarded = suspended_heap(n, keys, function(fn)
    return function(k)
      own_guard()
      return fn(k)
    end
  end)
  assert(g:stats().inflight == 0)
  out("inflight_guard_bytes", guarded - base)
  out("inflight_keylen", 8)
  out("inflight_core_bytes", singleflight._core.footprint(8))
  out("inflight_lua_bytes", sf - base)
  if PLAIN_YIELDS then
    local pl = suspended_heap(n, keys, function(fn)
      return function(k) return p:call(k, fn) end
    end)
    out("inflight_plain_bytes", pl - base)
  end
end

-- Opening a process-wide group by name, with few and with many other
-- groups alive: ns per open (and close) of one more name.
local function named_groups()
  local n = scaled(20000, 100)
  -- the names are made before the clock starts: a name is what a user
  -- has already, and making a string in a big heap is Lua's cost, not
  -- the group's
  local function per_open(tag)
    local names = {}
    for i = 1, n do
      names[i] = tag .. i
    end
    local t = clock()
    for i = 1, n do
      singleflight.group(names[i]):close()
    end
    return (clock() - t) / n * 1e9
  end
  local alive = {}
  for i = 1, 10 do
    alive[i] = singleflight.group("few:" .. i)
  end
  local few = per_open("probe-few:")
  local many = scaled(100000, 1000)
  for i = 11, many do
    alive[i] = singleflight.group("many:" .. i)
  end
  local lots = per_open("probe-many:")
  for i = 1, #alive do
    alive[i]:close()
  end
  out("named_open_10_ns", few)
  out("named_open_many_ns", lots)
  out("named_alive_many", many)
end

---------------------------------------------------------------------------

if mode == "speed" then
  uncontended()
  uncontended_yielding()
  contention()
  stampede()
  named_groups()
elseif mode == "contention" then -- the rows of a fn that yields, alone
  uncontended_yielding()
  contention()
  stampede()
elseif mode == "memory" then
  growth()
  inflight()
elseif mode == "floor" then
  floor_steps()
else
  error("unknown mode " .. tostring(mode))
end
