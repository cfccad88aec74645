-- How a duplicate in the leader's own Lua state waits: the backends
-- "coroutine", "none", "auto" and a custom table; duplicates that can't
-- wait; timeout and on_timeout.
local helpers = require "helpers"
local singleflight = require "singleflight"

local now = os.clock -- only for hang guards; the library has its own clock
do
  local core = require "singleflight.core"
  if type(core.now) == "function" then
    now = core.now
  end
end

local hold = helpers.hold

-- A custom backend on a round-robin scheduler, logging what it is asked.
-- A backend that logs its calls: the backend, and its record { log, objs }
-- (a backend table has the interface's fields only).
local function logging_backend(extra)
  local rec = { log = {}, objs = {} }
  local be = {}
  function be.new()
    local obj = { id = #rec.objs + 1 }
    rec.objs[#rec.objs + 1] = obj
    rec.log[#rec.log + 1] = "new"
    return obj
  end
  function be.wait(obj, secs)
    rec.log[#rec.log + 1] = { "wait", obj, secs }
    coroutine.yield()
  end
  function be.wake(obj, n)
    rec.log[#rec.log + 1] = { "wake", obj, n }
  end
  for k, v in pairs(extra or {}) do
    be[k] = v
  end
  return be, rec
end

local function entries(log, what)
  local out = {}
  for _, e in ipairs(log) do
    if type(e) == "table" and e[1] == what then
      out[#out + 1] = e
    end
  end
  return out
end

describe("waiting", function()
  describe("with backend 'coroutine'", function()
    it("makes duplicates yield until the leader is done", function()
      local g = singleflight.new { backend = "coroutine" }
      local s = helpers.scheduler()
      local leader, gate = hold(s, g, "k", "v")
      local dup = s.go(function() return g:call("k", error) end)
      for _ = 1, 5 do
        s.round()
        assert.is_false(dup.done) -- still waiting, yielding each round
      end
      gate.open()
      s.run()
      assert.same({ n = 3, "v", nil, true }, dup.res)
      assert.same({ n = 3, "v", nil, true }, leader.res)
    end)

    it("runs fn once for 1000 coroutines on one key", function()
      local g = singleflight.new { backend = "coroutine" }
      local s = helpers.scheduler()
      local runs, got = 0, 0
      for _ = 1, 1000 do
        s.go(function()
          local v = g:call("k", function()
            runs = runs + 1
            for _ = 1, 3 do coroutine.yield() end
            return "v"
          end)
          if v == "v" then got = got + 1 end
        end)
      end
      s.run()
      assert.equal(1, runs)
      assert.equal(1000, got)
      assert.same({}, s.errs)
    end)

    it("lets a duplicate wait inside pcall where Lua yields across it (5.2+)", function()
      if helpers.lua51 then
        return
      end
      local g = singleflight.new { backend = "coroutine" }
      local s = helpers.scheduler()
      local _, gate = hold(s, g, "k", "v")
      local dup = s.go(function() return pcall(g.call, g, "k", error) end)
      s.round()
      gate.open()
      s.run()
      assert.same({ n = 4, true, "v", nil, true }, dup.res)
    end)
  end)

  describe("by a duplicate that can't wait", function()
    local function leader_and(g, try)
      local s = helpers.scheduler()
      local leader, gate = hold(s, g, "k", "v")
      local ok, e = try()
      gate.open()
      s.run()
      -- nothing else disturbed: the leader ran alone, unshared
      assert.same({ n = 3, "v", nil, false }, leader.res)
      local st = g:stats()
      assert.equal(0, st.shared)
      assert.equal(1, st.executions)
      assert.equal(0, st.inflight)
      return ok, e
    end

    it("raises at once in the main coroutine, naming the key and the reason", function()
      local g = singleflight.new { backend = "coroutine" }
      local ran = false
      local ok, e = leader_and(g, function()
        return pcall(g.call, g, "k", function() ran = true end)
      end)
      assert.is_false(ok)
      assert.is_false(ran)
      assert.equal("string", type(e))
      assert.matches('^singleflight: cannot wait for key "k": ', e)
      assert.matches("main coroutine", e, 1, true)
    end)

    it("raises with backend 'none'", function()
      local g = singleflight.new { backend = "none" }
      local ok, e = leader_and(g, function()
        local co = coroutine.create(function() return g:call("k", error) end)
        local r = helpers.pack(coroutine.resume(co))
        assert.equal("dead", coroutine.status(co)) -- at once, no yield
        return r[1], r[2]
      end)
      assert.is_false(ok)
      assert.matches('^singleflight: cannot wait for key "k": ', e)
      assert.matches('"none"', e, 1, true)
    end)

    it("raises with backend 'auto' outside any scheduler", function()
      if rawget(_G, "ngx") then
        return
      end
      local g = singleflight.new() -- "auto" is the default
      local ok, e = leader_and(g, function()
        local co = coroutine.create(function() return g:call("k", error) end)
        return coroutine.resume(co)
      end)
      assert.is_false(ok)
      assert.matches('^singleflight: cannot wait for key "k": ', e)
    end)

    -- Regression: Lua 5.1 and 5.2 let the failed yield escape, with the
    -- duplicate still counted and the leader's result marked shared.
    it("raises where the coroutine can't yield (a C function's callback)", function()
      local g = singleflight.new { backend = "coroutine" }
      local ok, e = leader_and(g, function()
        local co = coroutine.create(function()
          local got
          table.sort({ 2, 1 }, function(a, b)
            got = helpers.pack(pcall(g.call, g, "k", error))
            return a < b
          end)
          return got
        end)
        local r = helpers.pack(coroutine.resume(co))
        assert.is_true(r[1])
        return r[2][1], r[2][2]
      end)
      assert.is_false(ok)
      assert.matches('^singleflight: cannot wait for key "k": ', e)
      assert.matches("yield", e, 1, true)
    end)

    it("raises inside pcall on Lua 5.1, which can't yield across it", function()
      if not helpers.lua51 then
        return
      end
      local g = singleflight.new { backend = "coroutine" }
      local ok, e = leader_and(g, function()
        local co = coroutine.create(function() return pcall(g.call, g, "k", error) end)
        local r = helpers.pack(coroutine.resume(co))
        return r[2], r[3]
      end)
      assert.is_false(ok)
      assert.matches('^singleflight: cannot wait for key "k": ', e)
    end)

    it("quotes a binary key in the message", function()
      local g = singleflight.new { backend = "none" }
      local co = coroutine.wrap(function()
        return g:call("a\0\"b", function() coroutine.yield() end)
      end)
      co()
      local ok, e = pcall(g.call, g, "a\0\"b", error)
      assert.is_false(ok)
      assert.matches('cannot wait for key "a\\x00\\"b"', e, 1, true)
      co()
    end)
  end)

  describe("with a custom backend table", function()
    it("uses new, wait and wake: one wait object per call, woken once for all", function()
      local be, rec = logging_backend()
      local g = singleflight.new { backend = be }
      local s = helpers.scheduler()
      local _, gate = hold(s, g, "k", "v")
      local dups = {}
      for i = 1, 3 do
        dups[i] = s.go(function() return g:call("k", error) end)
      end
      s.round()
      assert.equal(1, #rec.objs)
      local waits = entries(rec.log, "wait")
      assert.equal(3, #waits)
      for _, w in ipairs(waits) do
        assert.equal(rec.objs[1], w[2])
        assert.is_nil(w[3]) -- no timeout: no limit
      end
      assert.equal(0, #entries(rec.log, "wake"))
      gate.open()
      s.run()
      local wakes = entries(rec.log, "wake")
      assert.equal(1, #wakes)
      assert.equal(rec.objs[1], wakes[1][2])
      assert.equal(3, wakes[1][3])
      for i = 1, 3 do
        assert.same({ n = 3, "v", nil, true }, dups[i].res)
      end
    end)

    it("gets a fresh wait object for the next call", function()
      local be, rec = logging_backend()
      local g = singleflight.new { backend = be }
      for round = 1, 2 do
        local s = helpers.scheduler()
        local _, gate = hold(s, g, "k", round)
        local dup = s.go(function() return g:call("k", error) end)
        s.round()
        gate.open()
        s.run()
        assert.equal(round, dup.res[1])
      end
      assert.equal(2, #rec.objs)
      local wakes = entries(rec.log, "wake")
      assert.equal(rec.objs[1], wakes[1][2])
      assert.equal(rec.objs[2], wakes[2][2])
    end)

    it("works without new: the same wait object for wait and wake", function()
      local be, rec = logging_backend()
      be.new = nil
      local g = singleflight.new { backend = be }
      local s = helpers.scheduler()
      local _, gate = hold(s, g, "k", "v")
      local dup = s.go(function() return g:call("k", error) end)
      s.round()
      gate.open()
      s.run()
      local wait, wake = entries(rec.log, "wait")[1], entries(rec.log, "wake")[1]
      assert.is_not_nil(wait[2])
      assert.equal(wait[2], wake[2])
      assert.equal(1, wake[3])
      assert.equal("v", dup.res[1])
    end)

    it("keeps waiting when wait returns early", function()
      local calls = 0
      local be = {
        wait = function()
          calls = calls + 1
          if calls % 2 == 0 then -- every other time: return at once
            coroutine.yield()
          end
        end,
        wake = function() end,
      }
      local g = singleflight.new { backend = be }
      local s = helpers.scheduler()
      local _, gate = hold(s, g, "k", "v")
      local dup = s.go(function() return g:call("k", error) end)
      for _ = 1, 3 do s.round() end
      assert.is_false(dup.done)
      gate.open()
      s.run()
      assert.equal("v", dup.res[1])
      assert.is_true(calls >= 4)
    end)

    it("asks can_wait and raises with its reason", function()
      local be, rec = logging_backend {
        can_wait = function() return false, "no event loop running" end,
      }
      local g = singleflight.new { backend = be }
      local s = helpers.scheduler()
      local leader, gate = hold(s, g, "k", "v")
      local dup = s.go(function() return g:call("k", error) end)
      s.round()
      assert.equal('singleflight: cannot wait for key "k": no event loop running', dup.err)
      assert.equal(0, #entries(rec.log, "wait"))
      gate.open()
      s.run()
      assert.same({ n = 3, "v", nil, false }, leader.res)
      assert.equal(0, g:stats().shared)
    end)

    it("waits when can_wait says yes", function()
      local be = logging_backend { can_wait = function() return true end }
      local g = singleflight.new { backend = be }
      local s = helpers.scheduler()
      local _, gate = hold(s, g, "k", "v")
      local dup = s.go(function() return g:call("k", error) end)
      s.round()
      gate.open()
      s.run()
      assert.equal("v", dup.res[1])
    end)

    it("passes wait's own error to the duplicate unchanged", function()
      local failure = { reason = "scheduler gone" }
      local be = { wait = function() error(failure) end, wake = function() end }
      local g = singleflight.new { backend = be }
      local s = helpers.scheduler()
      local leader, gate = hold(s, g, "k", "v")
      local dup = s.go(function() return g:call("k", error) end)
      s.round()
      assert.equal(failure, dup.err)
      gate.open()
      s.run()
      assert.equal("v", leader.res[1])
      if not helpers.lua51 then -- 5.1 can't catch it without blocking yields
        assert.is_false(leader.res[3])
        assert.equal(0, g:stats().shared)
      end
    end)
  end)

  describe("with a timeout", function()
    it("returns nil, TIMEOUT, false past the timeout", function()
      assert.equal("singleflight: wait timed out", singleflight.TIMEOUT)
      local g = singleflight.new { backend = "coroutine", timeout = 0.05 }
      local s = helpers.scheduler()
      local leader, gate = hold(s, g, "k", "v")
      local ran = false
      local dup = s.go(function() return g:call("k", function() ran = true end) end)
      local t0 = now()
      s.run_until(function()
        assert(now() - t0 < 30, "the wait did not time out")
        return dup.done
      end, 1e9)
      assert.same({ n = 3, nil, singleflight.TIMEOUT, false }, dup.res)
      assert.is_false(ran)
      assert.is_false(leader.done)
      gate.open()
      s.run()
      -- the duplicate joined before it gave up: shared, as Go says
      assert.same({ n = 3, "v", nil, true }, leader.res)
      assert.equal(1, g:stats().timeouts)
    end)

    it("times out at once with timeout = 0", function()
      local be = logging_backend()
      local g = singleflight.new { backend = be, timeout = 0 }
      local s = helpers.scheduler()
      local _, gate = hold(s, g, "k", "v")
      local dup = s.go(function() return g:call("k", error) end)
      s.resume(dup.co)
      assert.is_true(dup.done)
      assert.same({ n = 3, nil, singleflight.TIMEOUT, false }, dup.res)
      gate.open()
      s.run()
    end)

    it("gives the backend's wait the seconds left", function()
      local be, rec = logging_backend()
      local g = singleflight.new { backend = be, timeout = 30 }
      local s = helpers.scheduler()
      local _, gate = hold(s, g, "k", "v")
      s.go(function() return g:call("k", error) end)
      s.round()
      s.round()
      gate.open()
      s.run()
      local waits = entries(rec.log, "wait")
      assert.is_true(#waits >= 2)
      for _, w in ipairs(waits) do
        assert.equal("number", type(w[3]))
        assert.is_true(w[3] > 0 and w[3] <= 30)
      end
      assert.is_true(waits[2][3] <= waits[1][3])
    end)

    it("times out a backend whose wait returns at once", function()
      local be = { wait = function() end, wake = function() end }
      local g = singleflight.new { backend = be, timeout = 0.02 }
      local s = helpers.scheduler()
      local _, gate = hold(s, g, "k", "v")
      local co = coroutine.create(function() return g:call("k", error) end)
      assert.same({ true, nil, singleflight.TIMEOUT, false }, { coroutine.resume(co) })
      gate.open()
      s.run()
    end)

    it("with math.huge is no timeout", function()
      local be, rec = logging_backend()
      local g = singleflight.new { backend = be, timeout = math.huge }
      local s = helpers.scheduler()
      local _, gate = hold(s, g, "k", "v")
      local dup = s.go(function() return g:call("k", error) end)
      s.round()
      gate.open()
      s.run()
      assert.is_nil(entries(rec.log, "wait")[1][3])
      assert.equal("v", dup.res[1])
    end)

    it("leaves the call in flight for others to join", function()
      local g = singleflight.new { backend = "coroutine", timeout = 0 }
      local s = helpers.scheduler()
      local _, gate = hold(s, g, "k", "v")
      local first = s.go(function() return g:call("k", error) end)
      s.resume(first.co)
      assert.equal(singleflight.TIMEOUT, first.res[2])
      assert.equal(1, g:stats().inflight)
      gate.open()
      s.run()
      assert.equal(0, g:stats().inflight)
    end)

    it("with on_timeout = 'error' is the default", function()
      local g = singleflight.new { backend = "coroutine", timeout = 0, on_timeout = "error" }
      local s = helpers.scheduler()
      local _, gate = hold(s, g, "k", "v")
      local dup = s.go(function() return g:call("k", error) end)
      s.resume(dup.co)
      assert.same({ n = 3, nil, singleflight.TIMEOUT, false }, dup.res)
      gate.open()
      s.run()
    end)

    describe("and on_timeout = 'run'", function()
      it("runs fn itself with its arguments, unshared", function()
        local g = singleflight.new { backend = "coroutine", timeout = 0, on_timeout = "run" }
        local s = helpers.scheduler()
        local leader, gate = hold(s, g, "k", "v")
        local dup = s.go(function()
          return g:call("k", function(a, b) return a .. b, "own", "dropped" end, "x", "y")
        end)
        s.resume(dup.co)
        assert.same({ n = 3, "xy", "own", false }, dup.res)
        gate.open()
        s.run()
        assert.same({ n = 3, "v", nil, true }, leader.res) -- a duplicate joined
      end)

      it("may yield in its own fn", function()
        local g = singleflight.new { backend = "coroutine", timeout = 0, on_timeout = "run" }
        local s = helpers.scheduler()
        local _, gate = hold(s, g, "k", "v")
        local dup = s.go(function()
          return g:call("k", function()
            coroutine.yield()
            return "own"
          end)
        end)
        s.resume(dup.co)
        assert.is_false(dup.done)
        gate.open()
        s.run()
        assert.equal("own", dup.res[1])
      end)

      it("raises a panic error when its own fn raises", function()
        local g = singleflight.new { backend = "coroutine", timeout = 0, on_timeout = "run" }
        local s = helpers.scheduler()
        local _, gate = hold(s, g, "k", "v")
        local value = {}
        local dup = s.go(function()
          return g:call("k", function() error(value) end)
        end)
        s.resume(dup.co)
        assert.is_true(singleflight.is_panic(dup.err))
        assert.equal(value, dup.err.value)
        assert.equal("k", dup.err.key)
        assert.equal(1, g:stats().panics)
        gate.open()
        s.run()
        assert.equal(1, g:stats().panics)
      end)
    end)
  end)
end)
