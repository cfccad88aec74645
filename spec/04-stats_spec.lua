-- g:stats(): a fresh table of exact counters.
local helpers = require "helpers"
local singleflight = require "singleflight"

local FIELDS = { "inflight", "calls", "executions", "shared", "panics",
                 "timeouts", "abandoned", "forgotten" }

local function new_group(opts)
  opts = opts or {}
  opts.backend = opts.backend or "coroutine"
  return singleflight.new(opts)
end

-- The stats with the given fields changed from all zeros.
local function expect(changes)
  local t = {}
  for _, f in ipairs(FIELDS) do
    t[f] = changes[f] or 0
  end
  return t
end

describe("g:stats", function()
  it("starts at zero with exactly the documented fields", function()
    local st = new_group():stats()
    assert.same(expect {}, st)
    local n = 0
    for _ in pairs(st) do
      n = n + 1
    end
    assert.equal(#FIELDS, n)
  end)

  it("returns a fresh table every time", function()
    local g = new_group()
    local a = g:stats()
    local b = g:stats()
    assert.are_not.equal(a, b)
    a.calls = 99
    assert.equal(0, g:stats().calls)
  end)

  it("has integer counters on Lua 5.3 and later", function()
    if not helpers.integers then
      return
    end
    local g = new_group()
    g:call("k", function() end)
    for _, f in ipairs(FIELDS) do
      assert.equal("integer", math.type(g:stats()[f]), f)
    end
  end)

  it("counts a lone call", function()
    local g = new_group()
    g:call("k", function() end)
    assert.same(expect { calls = 1, executions = 1 }, g:stats())
    g:call("k", function() end)
    g["do"](g, "j", function() end)
    assert.same(expect { calls = 3, executions = 3 }, g:stats())
  end)

  it("counts duplicates as shared, one execution", function()
    local g = new_group()
    local s = helpers.scheduler()
    local gate = helpers.gate()
    for _ = 1, 3 do
      s.go(function()
        return g:call("k", function() gate.wait() end)
      end)
    end
    s.round()
    assert.same(expect { inflight = 1, calls = 3, executions = 1, shared = 2 }, g:stats())
    gate.open()
    s.run()
    assert.same(expect { calls = 3, executions = 1, shared = 2 }, g:stats())
  end)

  it("counts keys in flight", function()
    local g = new_group()
    local seen = {}
    g:call("a", function()
      seen[1] = g:stats().inflight
      g:call("b", function()
        seen[2] = g:stats().inflight
      end)
      seen[3] = g:stats().inflight
    end)
    seen[4] = g:stats().inflight
    assert.same({ 1, 2, 1, 0 }, seen)
  end)

  it("counts panics per execution, not per caller", function()
    local g = new_group()
    local s = helpers.scheduler()
    local gate = helpers.gate()
    for _ = 1, 3 do
      s.go(function()
        return g:call("k", function() gate.wait() error("x") end)
      end)
    end
    s.round()
    gate.open()
    s.run()
    assert.equal(3, #s.errs)
    pcall(g.call, g, "j", function() error("y") end)
    assert.same(expect { calls = 4, executions = 2, shared = 2, panics = 2 }, g:stats())
  end)

  it("counts forgotten keys and drops them from inflight", function()
    local g = new_group()
    local during
    g:call("k", function()
      g:forget("k")
      g:forget("k")
      g:forget("none")
      during = g:stats()
    end)
    assert.same(expect { calls = 1, executions = 1, forgotten = 1 }, during)
    assert.same(expect { calls = 1, executions = 1, forgotten = 1 }, g:stats())
  end)

  it("counts timed-out waiters", function()
    local g = new_group { timeout = 0 }
    local s = helpers.scheduler()
    local gate = helpers.gate()
    s.go(function()
      return g:call("k", function() gate.wait() end)
    end)
    local waiters = {}
    for i = 1, 2 do
      waiters[i] = s.go(function() return g:call("k", error) end)
    end
    s.round()
    assert.equal(singleflight.TIMEOUT, waiters[1].res[2])
    assert.equal(singleflight.TIMEOUT, waiters[2].res[2])
    gate.open()
    s.run()
    assert.same(expect { calls = 3, executions = 1, shared = 2, timeouts = 2 }, g:stats())
  end)

  it("counts a timed-out waiter that runs fn itself as an execution", function()
    local g = new_group { timeout = 0, on_timeout = "run" }
    local s = helpers.scheduler()
    local gate = helpers.gate()
    s.go(function()
      return g:call("k", function() gate.wait() end)
    end)
    local waiter = s.go(function()
      return g:call("k", function() return "own" end)
    end)
    s.round()
    assert.same({ n = 3, "own", nil, false }, waiter.res)
    gate.open()
    s.run()
    assert.same(expect { calls = 2, executions = 2, shared = 1, timeouts = 1 }, g:stats())
  end)

  it("counts abandoned calls", function()
    local g = new_group()
    local co = coroutine.create(function()
      return g:call("k", function() coroutine.yield() end)
    end)
    coroutine.resume(co)
    assert.same(expect { inflight = 1, calls = 1, executions = 1 }, g:stats())
    co = nil -- luacheck: ignore 311
    helpers.full_gc()
    assert.same(expect { calls = 1, executions = 1, abandoned = 1 }, g:stats())
  end)

  it("does not count bad arguments", function()
    local g = new_group()
    pcall(g.call, g, nil, function() end)
    pcall(g.call, g, "k", nil)
    pcall(g.call, g, {}, function() end)
    pcall(g.forget, g, {})
    assert.same(expect {}, g:stats())
  end)

  it("counts a duplicate that can't wait as a call, not as shared", function()
    local g = new_group()
    local co = coroutine.create(function()
      return g:call("k", function() coroutine.yield() return "v" end)
    end)
    coroutine.resume(co)
    local ok = pcall(g.call, g, "k", error) -- the main coroutine can't wait
    assert.is_false(ok)
    assert.same(expect { inflight = 1, calls = 2, executions = 1 }, g:stats())
    assert.same({ true, "v", nil, false }, { coroutine.resume(co) })
  end)

  it("keeps groups' counters apart", function()
    local a, b = new_group(), new_group()
    a:call("k", function() end)
    assert.same(expect { calls = 1, executions = 1 }, a:stats())
    assert.same(expect {}, b:stats())
  end)
end)
