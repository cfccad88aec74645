-- g:call: one execution per key in flight, results, sharing, yields and
-- recursion, inside one Lua state.
local helpers = require "helpers"
local singleflight = require "singleflight"

local pack = helpers.pack

local function new_group(opts)
  opts = opts or {}
  if opts.backend == nil then
    opts.backend = "coroutine"
  end
  return singleflight.new(opts)
end

local hold = helpers.hold

describe("g:call, ported from Go's x/sync singleflight tests", function()
  it("TestDo", function()
    local g = new_group()
    local v, err = g:call("key", function()
      return "bar", nil
    end)
    assert.equal("bar", v)
    assert.equal("string", type(v))
    assert.is_nil(err)
  end)

  it("TestDoErr", function()
    local g = new_group()
    local some_err = { message = "Some error" }
    local v, err = g:call("key", function()
      return nil, some_err
    end)
    assert.equal(some_err, err) -- the very same object
    assert.is_nil(v)
  end)

  it("TestDoDupSuppress", function()
    local g = new_group()
    local s = helpers.scheduler()
    local c -- the channel: nil until the test sends "bar"
    local calls, first_started = 0, false
    local function fn()
      calls = calls + 1
      if calls == 1 then
        first_started = true
      end
      local rounds = 0
      while c == nil do -- v := <-c
        rounds = rounds + 1
        assert(rounds < 10000, "nothing sent")
        coroutine.yield()
      end
      for _ = 1, 10 do -- let more callers enter call
        coroutine.yield()
      end
      return c, nil
    end
    local n = 10
    local tasks = {}
    for i = 1, n do
      tasks[i] = s.go(function()
        return g:call("key", fn)
      end)
    end
    s.run_until(function() return first_started end)
    s.round() -- every caller has reached call now
    c = "bar"
    s.run()
    assert.same({}, s.errs)
    for i = 1, n do
      assert.is_true(tasks[i].ok)
      assert.equal("bar", tasks[i].res[1])
      assert.is_nil(tasks[i].res[2])
    end
    assert.is_true(calls > 0 and calls < n)
    assert.equal(1, calls) -- every caller arrived while the first ran
  end)
end)

describe("g:call", function()
  it("is also g['do'], Go's name", function()
    local g = new_group()
    assert.equal(g.call, g["do"])
    local v, err, shared = g["do"](g, "k", function(a) return a * 2, "e" end, 21)
    assert.equal(42, v)
    assert.equal("e", err)
    assert.is_false(shared)
  end)

  it("returns v, err, shared: exactly three values", function()
    local g = new_group()
    local r = pack(g:call("k", function() return 1, 2 end))
    assert.equal(3, r.n)
    assert.same({ n = 3, 1, 2, false }, r)
  end)

  it("returns nil, nil, false when fn returns nothing", function()
    local g = new_group()
    local r = pack(g:call("k", function() end))
    assert.equal(3, r.n)
    assert.is_nil(r[1])
    assert.is_nil(r[2])
    assert.is_false(r[3])
  end)

  it("drops fn's results past the second", function()
    local g = new_group()
    local r = pack(g:call("k", function() return "a", "b", "c", "d" end))
    assert.equal(3, r.n)
    assert.equal("a", r[1])
    assert.equal("b", r[2])
    assert.is_false(r[3])
  end)

  it("keeps a nil v with a non-nil err", function()
    local g = new_group()
    local v, err, shared = g:call("k", function() return nil, "not found" end)
    assert.is_nil(v)
    assert.equal("not found", err)
    assert.is_false(shared)
  end)

  it("passes the extra arguments through, nils and count included", function()
    local g = new_group()
    local seen
    g:call("k", function(...) seen = pack(...) end, nil, 2, nil, "x", nil)
    assert.same({ n = 5, nil, 2, nil, "x", nil }, seen)
    g:call("k", function(...) seen = pack(...) end)
    assert.equal(0, seen.n)
  end)

  it("calls a callable table as fn(...): __call gets the table, then the arguments", function()
    local g = new_group()
    local calls = 0
    local obj = setmetatable({}, {
      __call = function(self, a, b)
        calls = calls + 1
        return { self = self, a = a, b = b }
      end,
    })
    local v, err, shared = g:call("k", obj, "x", "y")
    assert.equal(obj, v.self)
    assert.equal("x", v.a)
    assert.equal("y", v.b)
    assert.is_nil(err)
    assert.is_false(shared)
    assert.equal(1, calls)
  end)

  it("runs fn once for duplicates that arrive while it runs", function()
    local g = new_group()
    local s = helpers.scheduler()
    local gate, runs = helpers.gate(), 0
    local tasks = {}
    for i = 1, 5 do
      tasks[i] = s.go(function()
        return g:call("k", function()
          runs = runs + 1
          gate.wait()
          return "v" .. i
        end)
      end)
    end
    s.round()
    gate.open()
    s.run()
    assert.same({}, s.errs)
    assert.equal(1, runs)
    for i = 1, 5 do
      assert.equal("v1", tasks[i].res[1]) -- the leader's, not their own
    end
  end)

  it("gives the duplicates the very same objects, not copies", function()
    local g = new_group()
    local s = helpers.scheduler()
    local gate = helpers.gate()
    local value, err = { deep = { 1, 2, 3 } }, { code = 42 }
    local tasks = {}
    for i = 1, 4 do
      tasks[i] = s.go(function()
        return g:call("k", function()
          gate.wait()
          return value, err
        end)
      end)
    end
    s.round()
    gate.open()
    s.run()
    for i = 1, 4 do
      assert.equal(value, tasks[i].res[1])
      assert.equal(err, tasks[i].res[2])
    end
  end)

  it("sets shared for the leader when a duplicate joined and always for duplicates", function()
    local g = new_group()
    local s = helpers.scheduler()
    local leader, gate = hold(s, g, "k", "r")
    local dup = s.go(function() return g:call("k", error) end)
    s.round()
    gate.open()
    s.run()
    assert.same({ n = 3, "r", nil, true }, leader.res)
    assert.same({ n = 3, "r", nil, true }, dup.res)
  end)

  it("leaves shared false for a leader nobody joined", function()
    local g = new_group()
    local s = helpers.scheduler()
    local leader, gate = hold(s, g, "k", "r")
    local other = s.go(function() return g:call("other", function() return "o" end) end)
    gate.open()
    s.run()
    assert.same({ n = 3, "r", nil, false }, leader.res)
    assert.same({ n = 3, "o", nil, false }, other.res)
  end)

  it("removes the key when the call completes: a later caller runs fn again", function()
    local g = new_group()
    local runs = 0
    local function fn()
      runs = runs + 1
      return runs
    end
    assert.equal(1, (g:call("k", fn)))
    assert.equal(2, (g:call("k", fn)))
    assert.equal(2, runs)
    assert.equal(0, g:stats().inflight)
  end)

  it("keeps keys apart: calls on other keys run while one is in flight", function()
    local g = new_group()
    local s = helpers.scheduler()
    local leader, gate = hold(s, g, "a", "A")
    assert.same({ "B", nil, false }, { g:call("b", function() return "B" end) })
    gate.open()
    s.run()
    assert.equal("A", leader.res[1])
  end)

  it("keeps groups apart: the same key in another group is another call", function()
    local g1, g2 = new_group(), new_group()
    local s = helpers.scheduler()
    local leader, gate = hold(s, g1, "k", 1)
    assert.equal(2, (g2:call("k", function() return 2 end)))
    gate.open()
    s.run()
    assert.equal(1, leader.res[1])
  end)

  describe("with a fn that yields", function()
    it("passes plain coroutine.yield values both ways", function()
      local g = new_group()
      local co = coroutine.wrap(function()
        return g:call("k", function(a)
          local b = coroutine.yield("out " .. a)
          local c = coroutine.yield("again " .. b)
          return a .. b .. c, "e"
        end, "1")
      end)
      assert.equal("out 1", co())
      assert.equal("again 2", co("2"))
      local v, err, shared = co("3")
      assert.equal("123", v)
      assert.equal("e", err)
      assert.is_false(shared)
    end)

    it("yields many values and nils through", function()
      local g = new_group()
      local co = coroutine.create(function()
        return g:call("k", function()
          local got = pack(coroutine.yield(nil, 1, nil))
          return got.n, got[2]
        end)
      end)
      local r = pack(coroutine.resume(co))
      assert.same({ n = 4, true, nil, 1, nil }, r)
      r = pack(coroutine.resume(co, nil, "b", nil))
      assert.same({ n = 4, true, 3, "b", false }, r)
    end)

    it("may yield inside pcall where the caller could (5.2 and later)", function()
      if helpers.lua51 then
        return -- Lua 5.1 itself can't yield across pcall
      end
      local g = new_group()
      local co = coroutine.create(function()
        return pcall(g.call, g, "k", function()
          return coroutine.yield("y") .. "!"
        end)
      end)
      assert.same({ true, "y" }, { coroutine.resume(co) })
      assert.same({ true, true, "x!", nil, false }, { coroutine.resume(co, "x") })
    end)

    it("may lead nested calls on other keys that yield", function()
      local g = new_group()
      local co = coroutine.wrap(function()
        return g:call("outer", function()
          local inner = g:call("inner", function()
            coroutine.yield("in inner")
            return "i"
          end)
          coroutine.yield("in outer")
          return inner .. "o"
        end)
      end)
      assert.equal("in inner", co())
      assert.equal(2, g:stats().inflight)
      assert.equal("in outer", co())
      assert.equal(1, g:stats().inflight)
      assert.equal("io", co())
      assert.equal(0, g:stats().inflight)
    end)

    it("gives a panic, and no stuck key, when the caller is the main coroutine", function()
      local g = new_group()
      local ok, e = pcall(g.call, g, "k", function()
        coroutine.yield()
        return "never"
      end)
      assert.is_false(ok)
      assert.is_true(singleflight.is_panic(e))
      assert.matches("yield", tostring(e.value))
      assert.equal(0, g:stats().inflight)
      assert.equal("again", (g:call("k", function() return "again" end)))
    end)

    -- Regression: on Lua 5.1 the failed yield escaped call and left the
    -- key in flight until the coroutine was collected.
    it("gives a panic, and no stuck key, when the caller can't yield here", function()
      local g = new_group()
      local co = coroutine.create(function()
        local got
        table.sort({ 2, 1 }, function(a, b)
          got = pack(pcall(g.call, g, "k", function()
            coroutine.yield("escaped")
            return "never"
          end))
          return a < b
        end)
        return got
      end)
      local ok, got = coroutine.resume(co)
      assert.is_true(ok)
      assert.equal("dead", coroutine.status(co))
      assert.is_false(got[1])
      assert.is_true(singleflight.is_panic(got[2]))
      assert.matches("yield", tostring(got[2].value))
      assert.equal(0, g:stats().inflight)
      assert.equal(1, g:stats().panics)
      assert.equal("again", (g:call("k", function() return "again" end)))
    end)
  end)

  describe("recursion", function()
    it("raises at once when fn calls call for its own key", function()
      local g = new_group()
      local inner
      local v = g:call("k", function()
        inner = pack(pcall(g.call, g, "k", function() return "never" end))
        return "outer"
      end)
      assert.equal("outer", v)
      assert.is_false(inner[1])
      assert.equal('singleflight: recursive call for key "k"', inner[2])
      assert.equal(0, g:stats().inflight)
    end)

    it("is a panic of the outer call when fn lets it through", function()
      local g = new_group()
      local ok, e = pcall(g.call, g, "k", function()
        return g:call("k", function() return "never" end)
      end)
      assert.is_false(ok)
      assert.is_true(singleflight.is_panic(e))
      assert.equal('singleflight: recursive call for key "k"', e.value)
      assert.matches("recursive call for key \"k\"", tostring(e), 1, true)
      assert.equal(0, g:stats().inflight)
      assert.equal(1, g:stats().executions)
    end)

    it("is detected through other keys and g['do']", function()
      local g = new_group()
      local inner
      g:call("a", function()
        return g:call("b", function()
          inner = pack(pcall(g["do"], g, "a", function() end))
        end)
      end)
      assert.is_false(inner[1])
      assert.matches('recursive call for key "a"', inner[2], 1, true)
    end)

    it("is detected for a number key and its string", function()
      local g = new_group()
      local inner
      g:call(7, function()
        inner = pack(pcall(g.call, g, "7", function() end))
      end)
      assert.equal('singleflight: recursive call for key "7"', inner[2])
    end)

    it("is detected after a yield inside fn", function()
      local g = new_group()
      local inner
      local co = coroutine.wrap(function()
        return g:call("k", function()
          coroutine.yield()
          inner = pack(pcall(g.call, g, "k", function() end))
          return "done"
        end)
      end)
      co()
      assert.equal("done", co())
      assert.is_false(inner[1])
      assert.matches("recursive call", inner[2], 1, true)
    end)

    it("is not raised for the same key in another group", function()
      local g1, g2 = new_group(), new_group()
      local v = g1:call("k", function()
        return g2:call("k", function() return "inner" end)
      end)
      assert.equal("inner", v)
    end)

    it("is not raised for another coroutine: that one is a duplicate", function()
      local g = new_group()
      local s = helpers.scheduler()
      local dup
      local leader = s.go(function()
        return g:call("k", function()
          dup = s.go(function() return g:call("k", error) end)
          for _ = 1, 3 do coroutine.yield() end
          return "L"
        end)
      end)
      s.run()
      assert.same({}, s.errs)
      assert.same({ n = 3, "L", nil, true }, leader.res)
      assert.same({ n = 3, "L", nil, true }, dup.res)
    end)
  end)
end)
