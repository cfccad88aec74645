-- max_age: a call that has held its key that long counts as abandoned,
-- though its leader still runs: the first waiter (or, with none, the next
-- caller) takes over and shares its new execution; the old leader's result
-- goes to its own caller only.
local singleflight = require "singleflight"
local helpers = require "helpers"
local X = require "xthreads"

local now = singleflight._core.now

-- Runs scheduler rounds until pred() holds, at most `secs` seconds (a hang
-- guard: the specs wait on a clock, not on rounds).
local function rounds_until(s, pred, secs)
  local deadline = now() + (secs or 10)
  while not pred() do
    assert(now() < deadline, "condition not met in time")
    s.round()
  end
end

-- A leader that holds `key` until the gate opens, returning `value`.
local function slow_leader(s, g, key, gate, value)
  return s.go(function()
    return g:call(key, function()
      gate.wait(1e9)
      return value
    end)
  end)
end

describe("max_age", function()
  it("is checked: a positive number of seconds", function()
    for _, bad in ipairs { 0, -1, "1", {}, 0 / 0 } do
      local ok, e = pcall(singleflight.new, { max_age = bad })
      assert.is_false(ok)
      assert.matches("bad option 'max_age' to 'new'", e)
    end
    assert.is_not_nil(singleflight.new { max_age = 0.5 })
    assert.is_not_nil(singleflight.new { max_age = math.huge })
  end)

  it("hands a too-old call's waiters to the first of them; its result goes to its leader only",
     function()
    local s = helpers.scheduler()
    local g = singleflight.new { backend = "coroutine", max_age = 0.05 }
    local gate = helpers.gate()
    local old = slow_leader(s, g, "k", gate, "old")
    s.round()
    local runs = 0
    local waiters = {}
    for i = 1, 3 do
      waiters[i] = s.go(function()
        return g:call("k", function()
          runs = runs + 1
          coroutine.yield() -- the other waiters join this one meanwhile
          return "new"
        end)
      end)
    end
    s.round()
    assert.equal(3, g:stats().shared)
    rounds_until(s, function()
      return waiters[1].done and waiters[2].done and waiters[3].done
    end)
    for i = 1, 3 do
      assert.equal("new", waiters[i].res[1], "waiter " .. i)
      assert.is_true(waiters[i].res[3])
    end
    assert.equal(1, runs) -- one take-over, shared by the other waiters
    assert.is_false(old.done)
    assert.equal(1, g:stats().abandoned)
    gate.open()
    rounds_until(s, function() return old.done end)
    assert.same({ "old", nil, true, n = 3 }, old.res) -- its own result only
    assert.equal(0, g:stats().inflight)
    assert.same({}, s.errs)
  end)

  it("lets the next caller lead when nobody waited", function()
    local s = helpers.scheduler()
    local g = singleflight.new { backend = "coroutine", max_age = 0.02 }
    local gate = helpers.gate()
    local old = slow_leader(s, g, "k", gate, "old")
    s.round()
    local t = now()
    while now() - t < 0.05 do end -- past max_age
    local v, err, shared = g:call("k", function() return "next" end)
    assert.same({ "next", nil, false }, { v, err, shared })
    assert.equal(1, g:stats().abandoned)
    gate.open()
    rounds_until(s, function() return old.done end)
    assert.equal("old", old.res[1])
    assert.same({}, s.errs)
  end)

  it("never replaces a call younger than max_age", function()
    local s = helpers.scheduler()
    local g = singleflight.new { backend = "coroutine", max_age = 60 }
    local gate = helpers.gate()
    local old = slow_leader(s, g, "k", gate, "old")
    s.round()
    local w = s.go(function() return g:call("k", function() return "new" end) end)
    for _ = 1, 50 do s.round() end
    assert.is_false(w.done)
    gate.open()
    rounds_until(s, function() return w.done and old.done end)
    assert.equal("old", w.res[1])
    assert.equal(0, g:stats().abandoned)
  end)

  it("applies to a waiter whose leader's result comes after it expired", function()
    local s = helpers.scheduler()
    local g = singleflight.new { backend = "coroutine", max_age = 0.03 }
    local gate = helpers.gate()
    local old = slow_leader(s, g, "k", gate, "old")
    s.round()
    local taker_gate = helpers.gate()
    local w = s.go(function()
      return g:call("k", function()
        taker_gate.wait(1e9)
        return "new"
      end)
    end)
    local late
    rounds_until(s, function() return g:stats().abandoned == 1 end)
    -- the old leader finishes while the new one runs: nobody gets "old" but it
    gate.open()
    rounds_until(s, function() return old.done end)
    late = s.go(function() return g:call("k", function() return "late" end) end)
    s.round()
    taker_gate.open()
    rounds_until(s, function() return w.done and late.done end)
    assert.equal("old", old.res[1])
    assert.equal("new", w.res[1])
    assert.equal("new", late.res[1])
    assert.same({}, s.errs)
  end)

  -- regression: with fn longer than max_age, each take-over's result went
  -- to its own caller only: a new execution every max_age, and waiters
  -- answered later and later, without end
  it("shorter than fn: the first execution to finish answers every caller still waiting",
     function()
    local s = helpers.scheduler()
    local g = singleflight.new { backend = "coroutine", max_age = 0.04 }
    local FN = 0.15 -- seconds each execution takes
    local execs = 0
    local function slow()
      execs = execs + 1
      local mine, t0 = execs, now()
      while now() - t0 < FN do
        coroutine.yield()
      end
      return "v" .. mine
    end
    local callers, led, started = {}, {}, now()
    -- a caller every 10 ms for 0.6 s: four times as long as an execution
    while now() - started < 0.6 do
      local i = #callers + 1
      callers[i] = s.go(function()
        local t0 = now()
        local v = g:call("k", function()
          led[i] = true
          return slow()
        end)
        return v, now() - t0, t0 - started
      end)
      local t = now()
      rounds_until(s, function() return now() - t >= 0.01 end)
    end
    rounds_until(s, function()
      for _, c in ipairs(callers) do
        if not c.done then
          return false
        end
      end
      return true
    end, 10)
    assert.same({}, s.errs)
    -- at most one take-over per max_age while an execution runs: the
    -- first finishes after FN, and every caller waiting then gets its
    -- result, so no caller waits for long past FN (they waited for as
    -- long as callers came: 0.6 s and more)
    assert.is_true(execs <= 2 * math.ceil(0.6 / 0.04), execs .. " executions")
    for i, c in ipairs(callers) do
      assert.is_string(c.res[1], "caller " .. i)
      assert.is_true(c.res[2] < 2 * FN + 0.1, ("caller %d waited %.3f s"):format(i, c.res[2]))
    end
    -- every caller that was waiting when the first execution ended, and
    -- led none, got the first execution's result
    local answered = 0
    for i, c in ipairs(callers) do
      if not led[i] and c.res[3] < FN - 0.02 then
        assert.equal("v1", c.res[1], "caller " .. i)
        answered = answered + 1
      end
    end
    assert.is_true(answered >= 5, answered .. " callers answered by the first execution")
    assert.equal(0, g:stats().inflight)
  end)

  local threads = X.available and it or pending
  threads("works across Lua states: a waiter in another thread takes over", function()
    local name = X.name("maxage")
    local g = singleflight.group(name)
    local t
    local v = g:call("k", function()
      t = X.spawn([[
        local name = ...
        local singleflight = require "singleflight"
        local g = singleflight.group(name, { max_age = 0.05 })
        return g:call("k", function() return "taken over" end)
      ]], name)
      local r = { X.join(t) }
      assert.equal("taken over", r[1])
      assert.is_false(r[3]) -- nobody else waited on the new execution
      return "old"
    end)
    assert.equal("old", v)
    assert.equal(1, g:stats().abandoned)
    assert.equal(0, g:stats().inflight)
    g:close()
  end)
end)
