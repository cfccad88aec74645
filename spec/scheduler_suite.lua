-- The specs every scheduler backend must pass, run by 30-cqueues_spec and
-- 31-copas_spec on each scheduler that is installed (see schedulers.lua).
--
-- suite.cases(make) returns a list of { name, fn }: each fn builds a fresh
-- scheduler with make() and drives it from the main coroutine, one step of
-- its loop at a time, with every loop bounded.
local assert = require "luassert"
local singleflight = require "singleflight"
local schedulers = require "schedulers"

local ypcall = schedulers.ypcall
local unpack = schedulers.unpack
local now = singleflight._core.now

local M = {}

local function pack(...)
  return { n = select("#", ...), ... }
end

local function count(t)
  local n = 0
  for _ in pairs(t) do
    n = n + 1
  end
  return n
end

local function full_gc()
  for _ = 1, 4 do
    collectgarbage("collect")
  end
end

-- Steps s until pred() holds. Returns the number of steps it took, or
-- fails after `secs` seconds (a hang guard, generous on purpose).
local function run_until(s, pred, what, secs)
  local deadline = now() + (secs or 10)
  local steps = 0
  while not pred() do
    assert(now() < deadline, "gave up waiting for " .. (what or "the scheduler")
           .. (s.errs[1] and (": " .. tostring(s.errs[1])) or ""))
    steps = steps + 1
    assert(steps < 10000000, "too many steps waiting for " .. tostring(what))
    s.step()
  end
  return steps
end

-- Counts the calls of the backend's wait while the spec runs.
local function count_waits(s)
  local module = s.module
  local orig = module.wait
  local counter = { calls = 0 }
  module.wait = function(obj, secs)
    counter.calls = counter.calls + 1
    return orig(obj, secs)
  end
  function counter.restore()
    module.wait = orig
  end
  return counter
end

-- A leader parked in a plain coroutine, outside the scheduler: it yields
-- from inside fn and is never resumed by anyone but the spec.
local function parked_leader(g, key)
  local co = coroutine.create(function()
    return g:call(key, function()
      coroutine.yield("parked")
      return "first"
    end)
  end)
  local ok, what = coroutine.resume(co)
  assert(ok and what == "parked", tostring(what))
  return co
end

-- g:start(...) called from a thread of the scheduler (cqueues can only
-- spawn from inside a controller).
local function start_in(s, g, ...)
  local args = pack(...)
  local f
  s.spawn(function() f = g:start(unpack(args, 1, args.n)) end)
  run_until(s, function() return f ~= nil end, "start")
  return f
end

local cases = {}

-- needs(s): nil when the case applies to scheduler s, else why not.
local function case(name, fn, needs)
  cases[#cases + 1] = { name = name, fn = fn, needs = needs }
end

local function stampede(s, opts)
  local N = 100
  local g = singleflight.new(opts)
  local gate = s.gate()
  local execs, res = 0, {}
  local waits = count_waits(s)
  local ok, err = pcall(function()
    for i = 1, N do
      s.spawn(function()
        res[i] = pack(g:call("stampede", function()
          execs = execs + 1
          gate.wait()
          return { n = execs }, "second"
        end))
      end)
    end
    run_until(s, function() return g:stats().shared == N - 1 end, "the duplicates")
    -- every duplicate is parked in the backend's wait, once
    assert.equal(N - 1, waits.calls)
    assert.equal(0, count(res))
    gate.open()
    local steps = run_until(s, function() return count(res) == N end, "the answers")
    -- the leader finishes in one turn and its duplicates wake in the next:
    -- woken by the leader, not by a timer or a poll
    assert.is_true(steps <= 3, "took " .. steps .. " turns")
    if not (opts.timeout and s.polls_timeouts) then
      assert.equal(N - 1, waits.calls)
    end
  end)
  waits.restore()
  assert(ok, err)
  assert.same({}, s.errs)
  assert.equal(1, execs)
  for i = 1, N do
    assert.equal(3, res[i].n)
    assert.equal(res[1][1], res[i][1]) -- the very same table
    assert.equal("second", res[i][2])
    assert.is_true(res[i][3])
  end
  assert.equal(1, res[1][1].n)
  local st = g:stats()
  assert.equal(N, st.calls)
  assert.equal(1, st.executions)
  assert.equal(N - 1, st.shared)
  assert.equal(0, st.inflight)
end

case("a stampede of 100 threads runs fn once and shares its results", function(make)
  local s = make()
  stampede(s, { backend = s.backend })
end)

case("a stampede with a timeout that is not reached wakes everyone at once", function(make)
  local s = make()
  stampede(s, { backend = s.backend, timeout = 30 })
end)

case("backend 'auto' finds the scheduler", function(make)
  stampede(make(), {})
end, function(s)
  return not s.auto and "backend 'auto' looks for the copas that require finds" or nil
end)

case("a duplicate that waits past timeout gets TIMEOUT", function(make)
  local s = make()
  local g = singleflight.new { backend = s.backend, timeout = 0.05 }
  local gate = s.gate()
  local lead, dup
  s.spawn(function()
    lead = pack(g:call("t", function() gate.wait() return "leader" end))
  end)
  run_until(s, function() return g:stats().inflight == 1 end, "the leader")
  s.spawn(function()
    dup = pack(g:call("t", function() return "duplicate" end))
  end)
  run_until(s, function() return dup ~= nil end, "the timeout")
  assert.same({ n = 3, nil, singleflight.TIMEOUT, false }, dup)
  assert.is_nil(lead)
  assert.equal(1, g:stats().timeouts)
  gate.open()
  run_until(s, function() return lead ~= nil end, "the leader")
  assert.equal("leader", lead[1])
  assert.same({}, s.errs)
  local st = g:stats()
  assert.equal(1, st.executions)
  assert.equal(0, st.inflight)
end)

case("on_timeout = \"run\" runs fn in the duplicate, unshared", function(make)
  local s = make()
  local g = singleflight.new { backend = s.backend, timeout = 0.05, on_timeout = "run" }
  local gate = s.gate()
  local lead, dup
  s.spawn(function()
    lead = pack(g:call("r", function() gate.wait() return "leader" end))
  end)
  run_until(s, function() return g:stats().inflight == 1 end, "the leader")
  s.spawn(function()
    dup = pack(g:call("r", function(x) return "own " .. x end, "run"))
  end)
  run_until(s, function() return dup ~= nil end, "the fall-through")
  assert.same({ n = 3, "own run", nil, false }, dup)
  assert.is_nil(lead)
  gate.open()
  run_until(s, function() return lead ~= nil end, "the leader")
  assert.equal("leader", lead[1])
  assert.same({}, s.errs)
  local st = g:stats()
  assert.equal(2, st.executions)
  assert.equal(1, st.timeouts)
end)

-- Go's TestDoChan
case("start: the future's wait gives fn's results", function(make)
  local s = make()
  local g = singleflight.new { backend = s.backend }
  local out, ran_in
  s.spawn(function()
    local f = g:start("key", function(a)
      ran_in = coroutine.running()
      return "bar" .. a
    end, "!")
    local v, err, shared = f:wait()
    out = { v, err, shared, f:ready(), pack(f:wait()) }
  end)
  run_until(s, function() return out ~= nil end, "the future")
  assert.equal("bar!", out[1])
  assert.is_nil(out[2])
  assert.is_false(out[3])
  assert.is_true(out[4])
  assert.same({ n = 3, "bar!", nil, false }, out[5])
  assert.is_not_nil(ran_in)
  assert.same({}, s.errs)
  assert.equal(1, g:stats().executions)
end)

case("start joins the call in flight and fn does not run again", function(make)
  local s = make()
  local g = singleflight.new { backend = s.backend }
  local gate = s.gate()
  local lead, other_ran = nil, false
  s.spawn(function()
    lead = pack(g:call("join", function() gate.wait() return { "from the leader" } end))
  end)
  run_until(s, function() return g:stats().inflight == 1 end, "the leader")
  local f = start_in(s, g, "join", function() other_ran = true end)
  run_until(s, function() return g:stats().shared == 1 end, "the future to join")
  assert.is_false(f:ready())
  gate.open()
  run_until(s, function() return f:ready() and lead ~= nil end, "the future")
  local v, err, shared = f:wait()
  assert.equal(lead[1], v)
  assert.is_nil(err)
  assert.is_true(shared)
  assert.is_true(lead[3])
  assert.is_false(other_ran)
  assert.same({}, s.errs)
end)

-- Go's DoChan: the first start leads from the moment it returns, before
-- the scheduler has run the thread it spawned for fn, so a second start
-- on the key, right after it, joins it. (A scheduler that runs a new
-- thread at once, as copas 1.x does, has run an fn that does not yield to
-- its end before start returns: the key is free again and the second
-- start leads a new call.)
local function back_to_back(make, yields)
  local s = make()
  local g = singleflight.new { backend = s.backend }
  local gate = yields and s.gate()
  local ran = {}
  local function fn(tag)
    ran[#ran + 1] = tag
    if gate then
      gate.wait()
    end
    return { tag }, "err " .. tag
  end
  local f1, f2, ran_early
  s.spawn(function()
    f1 = g:start("twice", fn, "first")
    ran_early = #ran == 1 and not yields
    f2 = g:start("twice", fn, "second")
  end)
  run_until(s, function() return f2 ~= nil end, "the two starts")
  local out1, out2
  s.spawn(function() out1 = pack(f1:wait()) end)
  s.spawn(function() out2 = pack(f2:wait()) end)
  if yields then
    run_until(s, function() return #ran == 1 and g:stats().shared == 1 end, "fn")
    for _ = 1, 5 do
      s.step()
    end
    assert.same({ "first" }, ran)
    assert.is_false(f1:ready())
    assert.is_false(f2:ready())
    assert.is_nil(out1)
    assert.is_nil(out2)
    local st = g:stats()
    assert.equal(1, st.inflight)
    assert.equal(2, st.calls)
    assert.equal(1, st.executions)
    gate.open()
  end
  run_until(s, function() return out1 ~= nil and out2 ~= nil end, "the futures")
  assert.same({}, s.errs)
  local st = g:stats()
  assert.equal(0, st.inflight)
  assert.equal(2, st.calls)
  if ran_early then
    assert.same({ "first", "second" }, ran)
    assert.same({ n = 3, { "first" }, "err first", false }, out1)
    assert.same({ n = 3, { "second" }, "err second", false }, out2)
    assert.equal(2, st.executions)
    assert.equal(0, st.shared)
    return
  end
  assert.same({ "first" }, ran)
  assert.same({ "first" }, out1[1])
  assert.equal(out1[1], out2[1]) -- the very same table
  assert.equal("err first", out1[2])
  assert.equal("err first", out2[2])
  assert.is_true(out1[3]) -- a duplicate joined
  assert.is_true(out2[3])
  assert.equal(1, st.executions)
  assert.equal(1, st.shared)
  assert.same({ n = 3, out1[1], "err first", true }, pack(f1:wait()))
  assert.same({ n = 3, out1[1], "err first", true }, pack(f2:wait()))
end

case("start twice back to back: the second joins the first, whose fn yields", function(make)
  back_to_back(make, true)
end)

case("start twice back to back: the second joins the first, whose fn does not yield", function(make)
  back_to_back(make, false)
end)

-- Go's TestPanicDoChan: Go's process dies; here wait raises the panic
case("start: a panic in fn is raised from wait, and nothing else dies", function(make)
  local s = make()
  local g = singleflight.new { backend = s.backend }
  local boom = { code = 42 }
  local f = start_in(s, g, "panic", function() error(boom) end)
  run_until(s, function() return f:ready() end, "the future")
  local ok, e = pcall(f.wait, f)
  assert.is_false(ok)
  assert.is_true(singleflight.is_panic(e))
  assert.equal(boom, e.value)
  assert.equal("panic", e.key)
  local ok2, e2 = pcall(f.wait, f)
  assert.is_false(ok2)
  assert.equal(e, e2)
  assert.equal(1, g:stats().panics)
  assert.equal(0, g:stats().inflight)
  assert.same({}, s.errs)
  -- the scheduler and the group go on
  local f2 = start_in(s, g, "panic", function() return "fine" end)
  run_until(s, function() return f2:ready() end, "the next future")
  assert.equal("fine", (f2:wait()))
end)

-- Go's TestPanicDoSharedByDoChan
case("start: a panic in a call's leader reaches the future that joined it", function(make)
  local s = make()
  local g = singleflight.new { backend = s.backend }
  local gate = s.gate()
  local boom = { "panicking in call" }
  local lead
  s.spawn(function()
    lead = pack(ypcall(g.call, g, "shared panic", function()
      gate.wait()
      error(boom)
    end))
  end)
  run_until(s, function() return g:stats().inflight == 1 end, "the leader")
  local f = start_in(s, g, "shared panic", function() return "not me" end)
  run_until(s, function() return g:stats().shared == 1 end, "the future to join")
  gate.open()
  run_until(s, function() return f:ready() and lead ~= nil end, "the future")
  assert.is_false(lead[1])
  assert.is_true(singleflight.is_panic(lead[2]))
  assert.equal(boom, lead[2].value)
  local ok, e = pcall(f.wait, f)
  assert.is_false(ok)
  assert.is_true(singleflight.is_panic(e))
  assert.equal(boom, e.value)
  assert.equal("shared panic", e.key)
  assert.equal(1, g:stats().executions)
  assert.equal(1, g:stats().panics)
  assert.same({}, s.errs)
end)

local function abandoned(s, close)
  local g = singleflight.new { backend = s.backend }
  local co = parked_leader(g, "orphan")
  local gate = s.gate()
  local res, ran = {}, 0
  for i = 1, 3 do
    s.spawn(function()
      res[i] = pack(g:call("orphan", function()
        ran = ran + 1
        gate.wait()
        return "second"
      end))
    end)
  end
  run_until(s, function() return g:stats().shared == 3 end, "the duplicates")
  if close then
    assert(coroutine.close(co))
  end
  co = nil -- luacheck: ignore 311
  full_gc()
  -- the first duplicate back leads; the other two join it
  run_until(s, function() return g:stats().shared == 5 end, "the new leader")
  assert.equal(1, g:stats().abandoned)
  gate.open()
  run_until(s, function() return count(res) == 3 end, "the answers")
  assert.equal(1, ran)
  for i = 1, 3 do
    assert.equal("second", res[i][1])
    assert.is_true(res[i][3])
  end
  local st = g:stats()
  assert.equal(1, st.abandoned)
  assert.equal(2, st.executions)
  assert.equal(0, st.inflight)
  assert.same({}, s.errs)
end

case("a leader collected while parked hands over to a duplicate", function(make)
  abandoned(make(), false)
end)

case("a leader closed while parked hands over to a duplicate", function(make)
  abandoned(make(), true)
end, function()
  return not coroutine.close and "coroutine.close is Lua 5.4's" or nil
end)

case("a duplicate outside the scheduler gets a clear error", function(make)
  local s = make()
  local g = singleflight.new { backend = s.backend }
  local co = parked_leader(g, "k")
  local ok, e = pcall(g.call, g, "k", function() return "dup" end)
  assert.is_false(ok)
  assert.matches('singleflight: cannot wait for key "k": ', e, 1, true)
  assert.equal(0, g:stats().shared)
  local done = pack(coroutine.resume(co))
  assert.same({ n = 4, true, "first", nil, false }, done)
  assert.equal(0, g:stats().inflight)
end)

M.cases = cases
M.unpack = unpack

return M
