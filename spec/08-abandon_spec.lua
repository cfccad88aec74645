-- Abandoned leaders inside one Lua state: a leader coroutine closed
-- (coroutine.close, 5.4) or collected while suspended inside fn. The first
-- waiter becomes the new leader and runs its own fn; the rest wait for it.
local helpers = require "helpers"
local singleflight = require "singleflight"

-- Starts a leader coroutine for key, suspended inside fn for good; returns
-- a box holding it, the only reference to it, for abandon to drop or close.
local function stranded_leader(g, key)
  local co = coroutine.create(function()
    return g:call(key, function()
      coroutine.yield("inside")
      error("resumed an abandoned leader")
    end)
  end)
  assert.same({ true, "inside" }, { coroutine.resume(co) })
  return { co }
end

-- Waiters on key, each with fn returning its own name after `yields` yields.
local function waiters(s, g, key, n, yields)
  local tasks, runs = {}, {}
  for i = 1, n do
    tasks[i] = s.go(function()
      return g:call(key, function()
        runs[#runs + 1] = i
        for _ = 1, yields or 0 do coroutine.yield() end
        return "w" .. i
      end)
    end)
  end
  s.round()
  return tasks, runs
end

-- The two ways a leader goes away: dropped and collected (every version),
-- closed (5.4).
local ways = {
  { "garbage-collected while suspended", function(box)
      box[1] = nil
      helpers.full_gc()
    end },
}
if coroutine.close then
  ways[#ways + 1] = { "closed by coroutine.close", function(box)
      assert.is_true(coroutine.close(box[1]))
      box[1] = nil
    end }
end

for _, way in ipairs(ways) do
  local name, abandon = way[1], way[2]

  describe("a leader " .. name, function()
    it("hands the call to its only waiter, which runs its own fn", function()
      local g = singleflight.new { backend = "coroutine" }
      local s = helpers.scheduler()
      local tasks, runs = waiters(s, g, "k", 1)
      abandon(stranded_leader(g, "k"))
      s.run()
      assert.same({}, s.errs)
      assert.same({ 1 }, runs)
      assert.same({ n = 3, "w1", nil, false }, tasks[1].res)
      local st = g:stats()
      assert.equal(1, st.abandoned)
      assert.equal(2, st.executions)
      assert.equal(2, st.calls)
      assert.equal(0, st.inflight)
    end)

    it("makes the first waiter the new leader; the rest wait for it", function()
      local g = singleflight.new { backend = "coroutine" }
      local s = helpers.scheduler()
      local co = stranded_leader(g, "k")
      local tasks, runs = waiters(s, g, "k", 3, 2)
      abandon(co)
      s.run()
      assert.same({}, s.errs)
      assert.same({ 1 }, runs) -- only the first waiter's fn ran
      for i = 1, 3 do
        assert.same({ n = 3, "w1", nil, true }, tasks[i].res)
      end
      local st = g:stats()
      assert.equal(1, st.abandoned)
      assert.equal(2, st.executions)
      assert.equal(4, st.calls)
      assert.equal(0, st.inflight)
    end)

    it("frees the key when nobody waits", function()
      local g = singleflight.new { backend = "coroutine" }
      abandon(stranded_leader(g, "k"))
      helpers.full_gc()
      assert.equal(0, g:stats().inflight)
      assert.equal(1, g:stats().abandoned)
      local v, _, shared = g:call("k", function() return "fresh" end)
      assert.equal("fresh", v)
      assert.is_false(shared)
    end)

    it("abandons every call it was leading, nested ones too", function()
      local g = singleflight.new { backend = "coroutine" }
      local co = { coroutine.create(function()
        return g:call("outer", function()
          return g:call("inner", function()
            coroutine.yield()
          end)
        end)
      end) }
      coroutine.resume(co[1])
      assert.equal(2, g:stats().inflight)
      local s = helpers.scheduler()
      local outer = waiters(s, g, "outer", 1)
      local inner = waiters(s, g, "inner", 1)
      abandon(co)
      s.run()
      assert.same({}, s.errs)
      assert.equal("w1", outer[1].res[1])
      assert.equal("w1", inner[1].res[1])
      local st = g:stats()
      assert.equal(2, st.abandoned)
      assert.equal(0, st.inflight)
    end)

    it("gives the rest the new leader's panic if its fn raises", function()
      local g = singleflight.new { backend = "coroutine" }
      local s = helpers.scheduler()
      local co = stranded_leader(g, "k")
      local value = {}
      local tasks = {}
      for i = 1, 3 do
        tasks[i] = s.go(function()
          return g:call("k", function()
            coroutine.yield()
            error(value)
          end)
        end)
      end
      s.round()
      abandon(co)
      s.run()
      for i = 1, 3 do
        assert.is_true(singleflight.is_panic(tasks[i].err))
        assert.equal(value, tasks[i].err.value)
        assert.equal("k", tasks[i].err.key)
      end
      assert.equal(1, g:stats().panics)
      assert.equal(0, g:stats().inflight)
    end)

    it("wakes the waiters of a custom backend", function()
      local wakes = {}
      local be = {
        new = function() return {} end,
        wait = function() coroutine.yield() end,
        wake = function(obj, n) wakes[#wakes + 1] = { obj, n } end,
      }
      local g = singleflight.new { backend = be }
      local s = helpers.scheduler()
      local co = stranded_leader(g, "k")
      local tasks = waiters(s, g, "k", 2, 1)
      abandon(co)
      assert.equal(1, #wakes)
      assert.equal(2, wakes[1][2])
      s.run()
      assert.equal("w1", tasks[1].res[1])
      assert.equal("w1", tasks[2].res[1])
    end)

    it("raises for a waiter whose group handle was closed meanwhile", function()
      local g = singleflight.new { backend = "coroutine" }
      local s = helpers.scheduler()
      local box = stranded_leader(g, "k")
      local tasks, runs = waiters(s, g, "k", 1)
      g:close()
      abandon(box)
      s.run()
      assert.same({}, runs)
      assert.is_true(tasks[1].done)
      assert.matches("closed group", tasks[1].err, 1, true)
    end)

    it("leaves other keys and groups alone", function()
      local g, other = singleflight.new { backend = "coroutine" },
                       singleflight.new { backend = "coroutine" }
      local s = helpers.scheduler()
      local gate = helpers.gate()
      local steady = s.go(function()
        return g:call("steady", function() gate.wait() return "s" end)
      end)
      local steady2 = s.go(function()
        return other:call("k", function() gate.wait() return "o" end)
      end)
      s.round()
      abandon(stranded_leader(g, "k"))
      gate.open()
      s.run()
      assert.equal("s", steady.res[1])
      assert.equal("o", steady2.res[1])
      assert.equal(1, g:stats().abandoned)
      assert.equal(0, other:stats().abandoned)
    end)
  end)
end

describe("a leader that finished", function()
  it("is not abandoned when its coroutine is collected or closed", function()
    local g = singleflight.new { backend = "coroutine" }
    local co = coroutine.create(function()
      return g:call("k", function()
        coroutine.yield()
        return "v"
      end)
    end)
    coroutine.resume(co)
    assert.same({ true, "v", nil, false }, { coroutine.resume(co) })
    if coroutine.close then
      coroutine.close(co)
    end
    co = nil -- luacheck: ignore 311
    helpers.full_gc()
    assert.equal(0, g:stats().abandoned)
  end)

  it("is not abandoned by a coroutine that lives on and leads again", function()
    local g = singleflight.new { backend = "coroutine" }
    local co = coroutine.wrap(function()
      for i = 1, 3 do
        g:call("k", function()
          coroutine.yield(i)
        end)
      end
      return "end"
    end)
    assert.equal(1, co())
    assert.equal(2, co())
    assert.equal(3, co())
    helpers.full_gc()
    assert.equal(0, g:stats().abandoned)
    assert.equal("end", co())
    local st = g:stats()
    assert.equal(3, st.executions)
    assert.equal(0, st.abandoned)
    assert.equal(0, st.inflight)
  end)
end)

-- Regression: LuaJIT spun for ever when a collected leader's finalizer
-- woke its waiters through a compiled pairs() loop, the library's own or
-- one in a backend's wake. Run in a child process with hotloop=1, which
-- made every round of it hang, under a hang guard.
describe("abandonment reported from a finalizer under LuaJIT's JIT", function()
  it("wakes the waiters and returns", function()
    local jit = rawget(_G, "jit")
    if not (jit and jit.opt) then
      return
    end
    local lua = os.getenv("SINGLEFLIGHT_LUA") or "luajit"
    local script = os.tmpname()
    local f = assert(io.open(script, "w"))
    f:write(([[
      package.path = %q
      package.cpath = %q
      jit.opt.start("hotloop=1")
      local singleflight = require "singleflight"
      local custom = {
        new = function() return { waiting = true } end,
        wait = function() coroutine.yield() end,
        wake = function(obj)
          local n = 0
          for _ in pairs(obj) do
            n = n + 1
          end
          return n
        end,
      }
      local function round(backend, nwait)
        local g = singleflight.new { backend = backend }
        local box = { coroutine.create(function()
          return g:call("k", function() coroutine.yield() end)
        end) }
        coroutine.resume(box[1])
        local ws = {}
        for i = 1, nwait do
          ws[i] = coroutine.create(function()
            return g:call("k", function() coroutine.yield() return i end)
          end)
          coroutine.resume(ws[i])
        end
        box[1] = nil
        collectgarbage()
        collectgarbage()
        for _ = 1, 10 do
          for _, co in ipairs(ws) do
            if coroutine.status(co) == "suspended" then
              assert(coroutine.resume(co))
            end
          end
        end
        assert(g:stats().abandoned == 1, "not abandoned")
      end
      for _ = 1, 30 do
        round("coroutine", 3)
        round(custom, 2)
      end
      io.write("rounds done\n")
    ]]):format(package.path, package.cpath))
    f:close()
    local p = assert(io.popen("timeout 60 " .. lua .. " " .. script .. " 2>&1"))
    local out = p:read("*a")
    p:close()
    os.remove(script)
    assert.equal("rounds done\n", out)
  end)
end)

-- A started call's light thread closed while the scheduler still lists it
-- (Lua 5.4, cqueues): the future's wait takes over and answers, as the
-- waiters of a g:call leader closed the same way do.
describe("a started call's light thread closed by coroutine.close", function()
  local cqueues = coroutine.close and pcall(require, "cqueues") and require("cqueues")
  local test = cqueues and it or pending
  test("the future's wait takes over and answers", function()
    local cq = cqueues.new()
    local g = singleflight.new { backend = "cqueues" }
    local runs, leader, got = 0, nil, nil
    cq:wrap(function()
      local f = g:start("k", function()
        runs = runs + 1
        if runs == 1 then -- the first is closed while it sleeps
          leader = coroutine.running()
          cqueues.sleep(30)
        end
        return "v" .. runs
      end)
      got = { pcall(f.wait, f, 5) }
    end)
    cq:wrap(function()
      cqueues.sleep(0.01)
      assert(coroutine.close(leader))
    end)
    local deadline = cqueues.monotime() + 5 -- hang guard
    while not got and cqueues.monotime() < deadline do
      cq:step(0.01) -- (cqueues reports the closed thread it still lists)
    end
    assert.same({ true, "v2", nil, false }, got)
    assert.equal(2, runs)
    assert.equal(1, g:stats().abandoned)
    assert.equal(0, g:stats().inflight)
  end)
end)
