-- g:start with a custom backend: the future, and a spawn that fails.
describe("g:start", function()
  local singleflight = require "singleflight"
  local helpers = require "helpers"

  local function backend(sched, failing)
    return {
      name = "test",
      wait = function() coroutine.yield() end,
      wake = function() end,
      can_wait = function()
        local co, main = coroutine.running()
        return co ~= nil and not main, "not in a coroutine"
      end,
      spawn = function(f, ...)
        if failing then
          error("no room for another thread", 0)
        end
        sched.spawn(f, ...)
      end,
    }
  end

  it("joins the call in flight: one execution, the same table", function()
    local sched = helpers.scheduler()
    local g = singleflight.new { backend = backend(sched) }
    local runs, got = 0, {}
    sched.spawn(function()
      got.leader = { g:call("k", function()
        runs = runs + 1
        coroutine.yield()
        coroutine.yield()
        return { "v" }, "e"
      end) }
    end)
    sched.spawn(function()
      local f = g:start("k", function() runs = runs + 100 end)
      assert.is_false(f:ready())
      got.future = { f:wait() }
      assert.is_true(f:ready())
      got.again = { f:wait() }
    end)
    sched.run()
    assert.same({}, sched.errs)
    assert.equal(1, runs)
    assert.equal(got.leader[1], got.future[1])
    assert.equal("e", got.future[2])
    assert.is_true(got.future[3])
    assert.is_true(got.leader[3])
    assert.equal(got.future[1], got.again[1])
  end)

  it("says so when the backend has no spawn, and changes nothing", function()
    local g = singleflight.new { backend = "coroutine" }
    assert.has_error(function() g:start("k", function() end) end)
    local ok, e = pcall(g.start, g, "k", function() end)
    assert.is_false(ok)
    assert.matches("no spawn", e)
    assert.equal(0, g:stats().calls)
  end)

  it("joins a call in flight without spawning", function()
    local sched = helpers.scheduler()
    local be = backend(sched)
    local g = singleflight.new { backend = be }
    local leader, got
    sched.spawn(function()
      leader = { g:call("k", function()
        coroutine.yield()
        coroutine.yield()
        return "v"
      end) }
    end)
    sched.spawn(function()
      be.spawn = function() error("no room for another thread", 0) end
      local f = g:start("k", function() return "not run" end)
      got = { f:wait() }
    end)
    sched.run()
    assert.same({}, sched.errs)
    assert.same({ "v", nil, true }, got)
    assert.equal("v", leader[1])
    assert.is_true(leader[3])
    assert.equal(1, g:stats().executions)
    assert.equal(0, g:stats().inflight)
  end)

  it("raises when spawning the leader fails, and leaves the key free", function()
    local sched = helpers.scheduler()
    local be = backend(sched)
    local g = singleflight.new { backend = be }
    local err, later
    sched.spawn(function()
      be.spawn = function() error("no room for another thread", 0) end
      local ok, e = pcall(g.start, g, "k", function() return "not run" end)
      assert.is_false(ok)
      err = e
      later = { g:call("k", function() return "later" end) }
    end)
    sched.run()
    assert.same({}, sched.errs)
    assert.matches("no room for another thread", err)
    assert.same({ "later", nil, false }, later)
    assert.equal(0, g:stats().inflight)
  end)
end)
