-- g:forget(key): later callers start afresh; the forgotten call finishes
-- for those already waiting and leaves its successor alone.
local helpers = require "helpers"
local singleflight = require "singleflight"

local function new_group()
  return singleflight.new { backend = "coroutine" }
end

describe("g:forget", function()
  it("TestForget (Go issue 31420)", function()
    local g = new_group()
    local s = helpers.scheduler()
    local first_started, first_finished = false, false
    local unblock_first = helpers.gate()
    local first = s.go(function()
      return g:call("key", function()
        first_started = true
        unblock_first.wait()
        first_finished = true
      end)
    end)
    s.run_until(function() return first_started end)
    assert.is_true(g:forget("key"))

    local unblock_second = helpers.gate()
    local second = s.go(function()
      return g:call("key", function()
        unblock_second.wait()
        return 2
      end)
    end)
    s.resume(second.co) -- the second call is in flight now

    unblock_first.open()
    s.run_until(function() return first.done end)
    assert.is_true(first_finished)

    local third = s.go(function()
      return g:call("key", function() return 3 end)
    end)
    s.resume(third.co)

    unblock_second.open()
    s.run()
    assert.same({}, s.errs)
    assert.equal(2, second.res[1])
    assert.equal(2, third.res[1]) -- "We should receive result produced by second call"
    assert.is_true(third.res[3])
  end)

  it("returns true for a key in flight, false otherwise", function()
    local g = new_group()
    assert.is_false(g:forget("k"))
    g:call("k", function() end)
    assert.is_false(g:forget("k")) -- completed: nothing in flight
    local inside
    g:call("k", function() inside = g:forget("k") end)
    assert.is_true(inside)
  end)

  it("returns false the second time", function()
    local g = new_group()
    local first, second
    g:call("k", function()
      first = g:forget("k")
      second = g:forget("k")
    end)
    assert.is_true(first)
    assert.is_false(second)
    assert.equal(1, g:stats().forgotten)
  end)

  it("takes number keys as their tostring", function()
    local g = new_group()
    local a, b
    g:call("1", function() a = g:forget(1) end)
    g:call(2.5, function() b = g:forget("2.5") end)
    assert.is_true(a)
    assert.is_true(b)
  end)

  it("makes later callers start a new execution", function()
    local g = new_group()
    local s = helpers.scheduler()
    local gate = helpers.gate()
    local runs = 0
    local first = s.go(function()
      return g:call("k", function()
        runs = runs + 1
        gate.wait()
        return "first"
      end)
    end)
    s.round()
    assert.is_true(g:forget("k"))
    local v, err, shared = g:call("k", function()
      runs = runs + 1
      return "second"
    end)
    assert.equal("second", v)
    assert.is_nil(err)
    assert.is_false(shared)
    assert.equal(2, runs)
    gate.open()
    s.run()
    assert.equal("first", first.res[1])
  end)

  it("lets callers already waiting get the forgotten call's result", function()
    local g = new_group()
    local s = helpers.scheduler()
    local gate = helpers.gate()
    local value = {}
    local leader = s.go(function()
      return g:call("k", function()
        gate.wait()
        return value
      end)
    end)
    local waiters = {}
    for i = 1, 3 do
      waiters[i] = s.go(function() return g:call("k", error) end)
    end
    s.round()
    assert.is_true(g:forget("k"))
    local late = s.go(function() return g:call("k", function() return "late" end) end)
    gate.open()
    s.run()
    assert.same({}, s.errs)
    assert.equal(value, leader.res[1])
    assert.is_true(leader.res[3])
    for i = 1, 3 do
      assert.equal(value, waiters[i].res[1])
      assert.is_true(waiters[i].res[3])
    end
    assert.same({ n = 3, "late", nil, false }, late.res)
  end)

  it("lets callers already waiting get the forgotten call's panic", function()
    local g = new_group()
    local s = helpers.scheduler()
    local gate = helpers.gate()
    local leader = s.go(function()
      return g:call("k", function()
        gate.wait()
        error("forgotten and failed", 0)
      end)
    end)
    local waiter = s.go(function() return g:call("k", error) end)
    s.round()
    g:forget("k")
    gate.open()
    s.run()
    assert.is_true(singleflight.is_panic(leader.err))
    assert.is_true(singleflight.is_panic(waiter.err))
    assert.equal("forgotten and failed", waiter.err.value)
    assert.equal(0, g:stats().inflight)
  end)

  it("keeps the successor in flight when the forgotten call finishes", function()
    local g = new_group()
    local s = helpers.scheduler()
    local gate1, gate2 = helpers.gate(), helpers.gate()
    local first = s.go(function()
      return g:call("k", function() gate1.wait() return 1 end)
    end)
    s.round()
    g:forget("k")
    local second = s.go(function()
      return g:call("k", function() gate2.wait() return 2 end)
    end)
    s.round()
    assert.equal(1, g:stats().inflight)
    gate1.open()
    s.run_until(function() return first.done end)
    assert.equal(1, first.res[1])
    assert.equal(1, g:stats().inflight)
    -- the successor still answers for the key
    local joined = s.go(function() return g:call("k", error) end)
    s.resume(joined.co)
    assert.equal(1, g:stats().shared)
    gate2.open()
    s.run()
    assert.equal(2, second.res[1])
    assert.same({ n = 3, 2, nil, true }, joined.res)
    assert.equal(0, g:stats().inflight)
    -- and a successor forgotten in turn is detached, not the first again
    assert.is_false(g:forget("k"))
  end)

  it("lets fn forget its own key and then lead it again", function()
    local g = new_group()
    local inner
    local v = g:call("k", function()
      assert(g:forget("k"))
      inner = g:call("k", function() return "inner" end)
      return "outer"
    end)
    assert.equal("outer", v)
    assert.equal("inner", inner)
    assert.equal(2, g:stats().executions)
    assert.equal(0, g:stats().inflight)
  end)

  it("works on binary and long keys", function()
    local g = new_group()
    local long = string.rep("\0\1x", 349525)
    local a, b, c
    g:call("a\0b", function()
      a = g:forget("a\0c")
      b = g:forget("a\0b")
    end)
    g:call(long, function()
      c = g:forget(long:sub(1, -2) .. long:sub(-1))
    end)
    assert.is_false(a)
    assert.is_true(b)
    assert.is_true(c)
  end)

  it("counts only the keys it forgot in stats().forgotten", function()
    local g = new_group()
    g:forget("nothing")
    g:call("k", function()
      g:forget("k")
      g:forget("k")
      g:forget("other")
    end)
    local st = g:stats()
    assert.equal(1, st.forgotten)
    assert.equal(0, st.inflight)
  end)
end)
