-- The leader's fast path. A coroutine (or the main thread) that has led a
-- call before has its guard, and leads the next calls of a string key with
-- a function without making anything (on LuaJIT, through the FFI). Every
-- promise of g:call holds there as on the first call of a coroutine, which
-- the other spec files mostly exercise: these specs lead from a coroutine
-- that led before.
local singleflight = require "singleflight"
local helpers = require "helpers"

local full_gc = helpers.full_gc

local function warm(g)
  assert(g:call("warm-up", function() return true end))
end

-- A task of scheduler s that has led once, then leads g:call(key, fn).
local function warm_go(s, g, key, fn)
  return s.go(function()
    warm(g)
    return g:call(key, fn)
  end)
end

-- A leader that has led before, held inside fn at a gate until a
-- duplicate of another coroutine has joined; then fn ends with finish().
-- Returns both tasks, done.
local function with_duplicate(g, finish)
  local s = helpers.scheduler()
  local gate = helpers.gate()
  local leader = warm_go(s, g, "k", function()
    gate.wait()
    return finish()
  end)
  s.round()
  local dup = s.go(function()
    return g:call("k", function() return "dup ran" end)
  end)
  s.round()
  gate.open()
  s.run()
  return leader, dup
end

-- The panic that g:call("k", fn) raises in a thread that has led before;
-- the key is free again.
local function panic_of(g, fn)
  warm(g)
  local ok, e = pcall(g.call, g, "k", fn)
  assert.is_false(ok)
  assert.is_true(singleflight.is_panic(e))
  assert.equal(0, g:stats().inflight)
  return e
end

describe("a leader that has led before", function()
  it("passes its arguments to fn exactly, however many", function()
    local g = singleflight.new()
    local function count(...)
      return select("#", ...), { ... }
    end
    local function check()
      warm(g)
      for n = 0, 5 do
        local args = { "a", nil, 3, false, "e" }
        local got, seen = g:call("k", count, helpers.unpack(args, 1, n))
        assert.equal(n, got)
        for i = 1, n do
          assert.equal(args[i], seen[i])
        end
      end
    end
    check() -- the main thread
    local co = coroutine.create(check)
    local ok, e = coroutine.resume(co)
    assert(ok, e)
    assert.equal(14, g:stats().executions)
  end)

  it("shares its result with a duplicate of another coroutine", function()
    local g = singleflight.new { backend = "coroutine" }
    local t = {}
    local leader, dup = with_duplicate(g, function() return t, "e" end)
    assert.same({ n = 3, t, "e", true }, leader.res)
    assert.equal(t, leader.res[1])
    assert.equal(t, dup.res[1])
    assert.same({ n = 3, t, "e", true }, dup.res)
    local st = g:stats()
    assert.equal(2, st.executions)
    assert.equal(1, st.shared)
    assert.equal(0, st.inflight)
  end)

  it("raises its panic to itself and to its duplicates", function()
    local g = singleflight.new { backend = "coroutine" }
    local value = {}
    local leader, dup = with_duplicate(g, function() error(value) end)
    assert.is_false(leader.ok)
    assert.is_false(dup.ok)
    assert.is_true(singleflight.is_panic(leader.err))
    assert.equal(value, leader.err.value)
    assert.equal(value, dup.err.value)
    assert.equal(1, g:stats().panics)
    -- and alone
    assert.equal("alone", panic_of(g, function() error("alone", 0) end).value)
  end)

  it("refuses a recursive call", function()
    local g = singleflight.new()
    local e = panic_of(g, function()
      return g:call("k", function() end)
    end)
    assert.equal("singleflight: recursive call for key \"k\"", e.value)
  end)

  it("is abandoned when its coroutine is collected inside fn", function()
    local g = singleflight.new()
    local co = coroutine.create(function()
      warm(g)
      return g:call("k", function() coroutine.yield() end)
    end)
    assert(coroutine.resume(co))
    assert.equal(1, g:stats().inflight)
    co = nil -- luacheck: ignore 311
    full_gc()
    full_gc()
    assert.equal(0, g:stats().inflight)
    assert.equal(1, g:stats().abandoned)
    assert.equal("again", g:call("k", function() return "again" end))
  end)

  it("does not remove the successor of a call forgotten inside fn", function()
    local g = singleflight.new { backend = "coroutine" }
    local s = helpers.scheduler()
    local gate = helpers.gate()
    local old = warm_go(s, g, "k", function()
      gate.wait()
      return "old"
    end)
    s.round()
    assert.is_true(g:forget("k"))
    local new_gate = helpers.gate()
    local new = s.go(function()
      return g:call("k", function()
        new_gate.wait()
        return "new"
      end)
    end)
    s.round()
    gate.open()
    s.run_until(function() return old.done end)
    assert.same({ n = 3, "old", nil, false }, old.res)
    assert.equal(1, g:stats().inflight) -- the successor is still in flight
    new_gate.open()
    s.run()
    assert.same({ n = 3, "new", nil, false }, new.res)
  end)

  it("gives an expired call's result to its own caller only", function()
    local g = singleflight.new { backend = "coroutine", max_age = 0.02 }
    local s = helpers.scheduler()
    local gate = helpers.gate()
    local old = warm_go(s, g, "k", function()
      gate.wait()
      return "old"
    end)
    s.round()
    local t0 = singleflight._core.now()
    while singleflight._core.now() - t0 < 0.05 do end
    local new = s.go(function()
      return g:call("k", function() return "new" end)
    end)
    s.run_until(function() return new.done end)
    assert.same({ n = 3, "new", nil, false }, new.res)
    gate.open()
    s.run()
    -- its own result only; shared, as someone had joined it
    assert.same({ n = 3, "old", nil, true }, old.res)
    assert.equal(1, g:stats().abandoned)
  end)

  it("takes the classic way for what it does not handle", function()
    local g = singleflight.new()
    warm(g)
    assert.same({ "one" }, { (g:call(1, function() return "one" end)) })
    local callable = setmetatable({}, { __call = function(_, x) return x end })
    assert.equal("called", g:call("k", callable, "called"))
    g:close()
    assert.has_error(function() g:call("k", function() end) end)
    local ok, e = pcall(g.call, io.stdout, "k", function() end)
    assert.is_false(ok)
    assert.matches("bad argument #1 to 'call'", e)
  end)
end)

-- What a leader suspended in fn holds, beside plain Lua's singleflight
-- (bench/plain.lua): its coroutine's stack stays as small as a plain
-- call's would (a call frame that outgrows a new coroutine's stack makes
-- Lua double it, for every leader in flight).
describe("a leader suspended in fn", function()
  local on = (_VERSION == "Lua 5.4" or rawget(_G, "jit")) and it or pending
  on("holds no more than twice what plain Lua's singleflight does (5.4, LuaJIT)", function()
    package.path = "bench/?.lua;" .. package.path
    local plain = require "plain"
    local n = 2000
    local function held(call)
      local function fn()
        coroutine.yield()
        return true
      end
      full_gc()
      local before = collectgarbage("count")
      collectgarbage("stop")
      local cos = {}
      for i = 1, n do
        cos[i] = coroutine.create(function(k) return call(k, fn) end)
        assert(coroutine.resume(cos[i], "key" .. i))
      end
      local bytes = (collectgarbage("count") - before) * 1024 / n
      collectgarbage("restart")
      for i = 1, n do
        assert(coroutine.resume(cos[i]))
      end
      return bytes
    end
    local g, p = singleflight.new { backend = "coroutine" }, plain.new()
    local base = held(function(k, fn) return fn(k) end)
    local mine = held(function(k, fn) return g:call(k, fn) end) - base
    local theirs = held(function(k, fn) return p:call(k, fn) end) - base
    assert.is_true(mine <= 2 * theirs, ("%.0f bytes a leader, plain %.0f"):format(mine, theirs))
    assert.equal(0, g:stats().inflight)
  end)
end)
