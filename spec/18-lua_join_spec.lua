-- Same-state duplicates of a group private to the Lua state meet in Lua:
-- once a call has waiters here, later callers of its key wait in its
-- flight without crossing into the C core, which is crossed once per
-- execution, not once per caller. What the core did for each of them
-- still holds: a recursion is refused, a forget and a close are obeyed,
-- the counters count every caller, a leader that goes away hands over.
local singleflight = require "singleflight"
local core = require "singleflight.core"
local helpers = require "helpers"

-- Calls of the core's functions made while f runs (the running coroutine
-- and those it resumes: a hook per coroutine made by f's scheduler).
-- core.meets is not one: it asks the Lua state whether the running
-- coroutine can yield and which guard it has, and touches no call.
local core_fns = {}
for _, t in ipairs { core, core.methods } do
  for _, v in pairs(t) do
    if type(v) == "function" and debug.getinfo(v, "S").what == "C"
       and v ~= core.meets then
      core_fns[v] = true
    end
  end
end

local function counting()
  local n = 0
  local function hook()
    local info = debug.getinfo(2, "f")
    if info and core_fns[info.func] then
      n = n + 1
    end
  end
  return hook, function() return n end
end

local function fn_yielding(value, rounds)
  return function()
    for _ = 1, rounds or 1 do
      coroutine.yield()
    end
    return value
  end
end

-- Where the coroutine backend can tell that a wait won't fail (Lua 5.3 and
-- later, LuaJIT: coroutine.isyieldable); on 5.1 and 5.2 its waits are
-- protected, and each duplicate goes to the core.
local exact = coroutine.isyieldable ~= nil

describe("same-state duplicates that meet in Lua", function()
  local on_exact = exact and it or pending
  on_exact("a stampede of 1000 crosses into the core a handful of times, not per caller",
     function()
    local g = singleflight.new { backend = "coroutine" }
    local hook, crossings = counting()
    local s = helpers.scheduler()
    local tasks = {}
    for i = 1, 1000 do
      tasks[i] = s.go(function()
        return g:call("user:42", fn_yielding("fresh", 10))
      end)
      debug.sethook(tasks[i].co, hook, "c")
    end
    s.run()
    assert.same({}, s.errs)
    for i = 1, 1000 do
      assert.same({ n = 3, "fresh", nil, true }, tasks[i].res)
    end
    local st = g:stats()
    assert.equal(1, st.executions)
    assert.equal(1000, st.calls)
    assert.equal(999, st.shared)
    -- the leader's acquire and finish, the first duplicates' joins, the
    -- flight's settling: a few, whatever the number of callers
    assert.is_true(crossings() < 30, crossings() .. " calls into the core")
  end)

  it("counts them while they wait", function()
    local g = singleflight.new { backend = "coroutine" }
    local s = helpers.scheduler()
    local gate = helpers.gate()
    s.go(function()
      return g:call("k", function()
        gate.wait()
        return "v"
      end)
    end)
    for _ = 1, 9 do
      s.go(function() return g:call("k", fn_yielding("other")) end)
    end
    s.round()
    s.round()
    local st = g:stats()
    assert.equal(10, st.calls)
    assert.equal(9, st.shared)
    assert.equal(1, st.inflight)
    gate.open()
    s.run()
    st = g:stats()
    assert.equal(10, st.calls)
    assert.equal(9, st.shared)
    assert.equal(1, st.executions)
  end)

  it("a leader that calls its own key again is refused, not made to wait on itself",
     function()
    local g = singleflight.new { backend = "coroutine" }
    local s = helpers.scheduler()
    local gate = helpers.gate()
    local inner
    local leader = s.go(function()
      return g:call("k", function()
        gate.wait()
        inner = { pcall(g.call, g, "k", fn_yielding("inner")) }
        return "outer"
      end)
    end)
    local dups = {}
    for i = 1, 5 do -- enough for the later ones to meet in Lua
      dups[i] = s.go(function() return g:call("k", fn_yielding("dup")) end)
    end
    s.round()
    s.round()
    gate.open()
    s.run()
    assert.same({}, s.errs)
    assert.is_false(inner[1])
    assert.matches("recursive call for key \"k\"", tostring(inner[2]))
    assert.same({ n = 3, "outer", nil, true }, leader.res)
    for i = 1, 5 do
      assert.same({ n = 3, "outer", nil, true }, dups[i].res)
    end
  end)

  it("a duplicate that cannot yield where it calls is told so; the others wait on",
     function()
    local g = singleflight.new { backend = "coroutine" }
    local s = helpers.scheduler()
    local gate = helpers.gate()
    local leader = s.go(function()
      return g:call("k", function()
        gate.wait()
        return "v"
      end)
    end)
    local dups = {}
    for i = 1, 3 do -- the flight is there to meet once the first has joined
      dups[i] = s.go(function() return g:call("k", fn_yielding("dup")) end)
    end
    s.round()
    s.round()
    local cornered -- a sort's comparator: called from C, it can't yield
    local inside = s.go(function()
      table.sort({ 2, 1 }, function(a, b)
        cornered = cornered or { pcall(g.call, g, "k", fn_yielding("no")) }
        return a < b
      end)
      return "sorted"
    end)
    -- where the main thread calls: nothing to yield to
    local main = { pcall(g.call, g, "k", fn_yielding("no")) }
    s.round()
    gate.open()
    s.run()
    assert.same({}, s.errs)
    for _, r in ipairs { cornered, main } do
      assert.is_false(r[1])
      assert.matches('^singleflight: cannot wait for key "k": ', tostring(r[2]))
    end
    assert.same({ n = 1, "sorted" }, inside.res)
    assert.same({ n = 3, "v", nil, true }, leader.res)
    for i = 1, 3 do
      assert.same({ n = 3, "v", nil, true }, dups[i].res)
    end
    local st = g:stats()
    assert.equal(1, st.executions)
    assert.equal(3, st.shared)
    assert.equal(0, st.inflight)
  end)

  it("forget: callers after it start a new execution; those waiting get the old result",
     function()
    local g = singleflight.new { backend = "coroutine" }
    local s = helpers.scheduler()
    local gate = helpers.gate()
    local old = {}
    s.go(function()
      return g:call("k", function()
        gate.wait()
        return "old"
      end)
    end)
    for i = 1, 5 do
      old[i] = s.go(function() return g:call("k", fn_yielding("never")) end)
    end
    s.round()
    s.round()
    assert.is_true(g:forget("k"))
    local new = s.go(function() return g:call("k", fn_yielding("new")) end)
    s.round()
    gate.open()
    s.run()
    assert.same({}, s.errs)
    for i = 1, 5 do
      assert.equal("old", old[i].res[1])
    end
    assert.same({ n = 3, "new", nil, false }, new.res)
    assert.equal(2, g:stats().executions)
  end)

  it("a closed handle raises, whoever waits on its calls", function()
    local g = singleflight.new { backend = "coroutine" }
    local s = helpers.scheduler()
    local gate = helpers.gate()
    s.go(function()
      return g:call("k", function()
        gate.wait()
        return "v"
      end)
    end)
    for _ = 1, 5 do
      s.go(function() return g:call("k", fn_yielding("never")) end)
    end
    s.round()
    s.round()
    g:close()
    local late = s.go(function() return g:call("k", fn_yielding("late")) end)
    s.round()
    assert.is_true(late.done)
    assert.is_false(late.ok)
    assert.matches("closed", tostring(late.err))
    gate.open()
    s.run()
  end)

  -- regression: a duplicate that went to the core while the flight was
  -- registered (here: the key as a number, which the registry does not
  -- hold) kept the leader's guard in its frame as it waited: a collected
  -- leader was never seen go
  it("a leader collected away is seen, whichever way its duplicates joined", function()
    local g = singleflight.new { backend = "coroutine" }
    local s = helpers.scheduler()
    local leader = coroutine.create(function()
      return g:call("7", function()
        coroutine.yield()
        return "lost"
      end)
    end)
    coroutine.resume(leader)
    local runs = 0
    local function mine()
      runs = runs + 1
      coroutine.yield()
      return "taken over"
    end
    local dups = {
      s.go(function() return g:call("7", mine) end), -- registers the flight
      s.go(function() return g:call(7, mine) end), -- the core's way
      s.go(function() return g:call("7", mine) end), -- meets it in Lua
    }
    s.round()
    leader = nil -- luacheck: ignore 311
    helpers.full_gc()
    s.run(1000)
    assert.same({}, s.errs)
    assert.equal(1, runs)
    for i = 1, 3 do
      assert.equal("taken over", dups[i].res[1])
    end
    assert.equal(1, g:stats().abandoned)
  end)

  it("a leader closed or collected away: one of them takes over, the rest share it",
     function()
    local g = singleflight.new { backend = "coroutine" }
    local s = helpers.scheduler()
    local leader = { coroutine.create(function()
      return g:call("k", function()
        coroutine.yield()
        return "lost"
      end)
    end) }
    coroutine.resume(leader[1])
    local runs = 0
    local dups = {}
    for i = 1, 6 do
      dups[i] = s.go(function()
        return g:call("k", function()
          runs = runs + 1
          coroutine.yield()
          return "taken over"
        end)
      end)
    end
    s.round()
    s.round()
    if coroutine.close then
      assert(coroutine.close(leader[1]))
    end
    leader[1] = nil
    helpers.full_gc()
    s.run()
    assert.same({}, s.errs)
    assert.equal(1, runs)
    for i = 1, 6 do
      assert.equal("taken over", dups[i].res[1])
    end
    assert.equal(1, g:stats().abandoned)
    assert.equal(0, g:stats().inflight)
  end)
end)
