-- Errors raised by fn: panic errors for every caller.
local helpers = require "helpers"
local singleflight = require "singleflight"

local is_panic = singleflight.is_panic

local function new_group()
  return singleflight.new { backend = "coroutine" }
end

-- The error g:call(key, fn, ...) raises, in the calling coroutine.
local function catch(g, key, fn, ...)
  local r = helpers.pack(pcall(g.call, g, key, fn, ...))
  assert.is_false(r[1], "call did not raise")
  return r[2]
end

local function raiser(value)
  return function()
    error(value, 0)
  end
end

describe("a panic", function()
  it("TestPanicDo", function()
    local g = new_group()
    local function fn()
      error("invalid memory address or nil pointer dereference", 0)
    end
    local n = 5
    local s = helpers.scheduler()
    local tasks = {}
    for i = 1, n do
      tasks[i] = s.go(function() return g:call("key", fn) end)
    end
    s.run(100) -- hangs fail here
    local panics = 0
    for i = 1, n do
      assert.is_true(tasks[i].done)
      if is_panic(tasks[i].err) then
        panics = panics + 1
      end
    end
    assert.equal(n, panics)
    assert.equal(0, g:stats().inflight)
  end)

  it("TestPanicDo, with the duplicates joined before the panic", function()
    local g = new_group()
    local runs = 0
    local function fn()
      runs = runs + 1
      coroutine.yield()
      error("invalid memory address or nil pointer dereference", 0)
    end
    local n = 5
    local s = helpers.scheduler()
    local tasks = {}
    for i = 1, n do
      tasks[i] = s.go(function() return g:call("key", fn) end)
    end
    s.run(100)
    assert.equal(1, runs)
    for i = 1, n do
      local e = tasks[i].err
      assert.is_true(is_panic(e))
      assert.equal("invalid memory address or nil pointer dereference", e.value)
      assert.equal("key", e.key)
    end
    local st = g:stats()
    assert.equal(1, st.panics)
    assert.equal(1, st.executions)
    assert.equal(0, st.inflight)
  end)

  describe("keeps the raised value unchanged in e.value", function()
    it("a string", function()
      local e = catch(new_group(), "k", raiser("boom"))
      assert.equal("boom", e.value)
    end)

    it("a string with the position error() adds", function()
      local e = catch(new_group(), "k", function() error("boom") end)
      assert.matches("^.-02%-panic_spec%.lua:%d+: boom$", e.value)
    end)

    it("a runtime error's message", function()
      local e = catch(new_group(), "k", function()
        local t = false
        return t.field
      end)
      assert.matches("attempt to index", e.value, 1, true)
    end)

    it("a table: the same object", function()
      local value = { code = 7 }
      local e = catch(new_group(), "k", raiser(value))
      assert.equal(value, e.value)
      assert.is_false(is_panic(e.value))
    end)

    it("a table with a metatable: the same object, metatable kept", function()
      local mt = { __index = { kind = "custom" } }
      local value = setmetatable({}, mt)
      local e = catch(new_group(), "k", raiser(value))
      assert.equal(value, e.value)
      assert.equal(mt, getmetatable(e.value))
    end)

    it("nil", function()
      local e = catch(new_group(), "k", function() error(nil) end)
      assert.is_true(is_panic(e))
      assert.is_nil(e.value)
      assert.equal("singleflight: nil", tostring(e))
    end)

    it("false and numbers", function()
      assert.equal(false, catch(new_group(), "k", raiser(false)).value)
      assert.equal(42, catch(new_group(), "k", raiser(42)).value)
    end)

    it("a full userdata: the same object", function()
      local value = singleflight.new()
      local e = catch(new_group(), "k", raiser(value))
      assert.equal(value, e.value)
      assert.equal("userdata", type(e.value))
      e = catch(new_group(), "k", raiser(io.stdout))
      assert.equal(io.stdout, e.value)
    end)

    it("a function: the same object", function()
      local value = function() end
      assert.equal(value, catch(new_group(), "k", raiser(value)).value)
    end)

    it("another call's panic: wrapped, with this call's key", function()
      local g = new_group()
      local inner
      local e = catch(g, "outer", function()
        local ok, err = pcall(g.call, g, "inner", raiser("deep"))
        assert(not ok)
        inner = err
        error(err, 0)
      end)
      assert.equal(inner, e.value)
      assert.is_true(is_panic(e.value))
      assert.equal("inner", e.value.key)
      assert.equal("outer", e.key)
      -- the text says singleflight once, however deep the nesting
      assert.equal("singleflight: deep", tostring(e))
      assert.equal("singleflight: deep", tostring(e.value))
    end)
  end)

  it("has the leader's traceback where fn raised", function()
    local function explode()
      error("boom", 0)
    end
    local e = catch(new_group(), "k", function()
      explode()
    end)
    assert.equal("string", type(e.traceback))
    assert.matches("stack traceback", e.traceback, 1, true)
    assert.matches("02-panic_spec.lua", e.traceback, 1, true)
  end)

  it("has the key as a string", function()
    assert.equal("k", catch(new_group(), "k", raiser("x")).key)
    assert.equal("12", catch(new_group(), 12, raiser("x")).key)
    assert.equal("1.5", catch(new_group(), 1.5, raiser("x")).key)
    assert.equal("a\0b", catch(new_group(), "a\0b", raiser("x")).key)
  end)

  describe("tostring", function()
    it("is 'singleflight: ' and the value's text", function()
      assert.equal("singleflight: boom", tostring(catch(new_group(), "k", raiser("boom"))))
      assert.equal("singleflight: 42", tostring(catch(new_group(), "k", raiser(42))))
      assert.equal("singleflight: false", tostring(catch(new_group(), "k", raiser(false))))
      local t = {}
      assert.equal("singleflight: " .. tostring(t), tostring(catch(new_group(), "k", raiser(t))))
    end)

    it("uses the value's __tostring", function()
      local value = setmetatable({}, { __tostring = function() return "custom text" end })
      assert.equal("singleflight: custom text", tostring(catch(new_group(), "k", raiser(value))))
    end)

    it("never raises, even when the value's __tostring raises", function()
      local value = setmetatable({}, { __tostring = function() error("no text for you") end })
      local e = catch(new_group(), "k", raiser(value))
      assert.equal(value, e.value)
      local ok, s = pcall(tostring, e)
      assert.is_true(ok)
      assert.equal("string", type(s))
      assert.matches("^singleflight: ", s)
    end)

    it("never raises when the value's __tostring returns no string", function()
      local value = setmetatable({}, { __tostring = function() return {} end })
      local e = catch(new_group(), "k", raiser(value))
      local ok, s = pcall(tostring, e)
      assert.is_true(ok)
      assert.matches("^singleflight: ", s)
    end)

    it("never raises for a value whose __tostring yields", function()
      local value = setmetatable({}, { __tostring = function() return coroutine.yield() end })
      local e = catch(new_group(), "k", raiser(value))
      local ok, s = pcall(tostring, e)
      assert.is_true(ok)
      assert.matches("^singleflight: ", s)
    end)
  end)

  describe("singleflight.is_panic", function()
    it("is true for a panic error", function()
      assert.is_true(is_panic(catch(new_group(), "k", raiser("x"))))
    end)

    it("is false for anything else", function()
      local e = catch(new_group(), "k", raiser({}))
      assert.is_false(is_panic(e.value))
      assert.is_false(is_panic(nil))
      assert.is_false(is_panic())
      assert.is_false(is_panic("singleflight: x"))
      assert.is_false(is_panic({ value = "x", traceback = "", key = "k" }))
      assert.is_false(is_panic(setmetatable({}, { __name = "singleflight.Panic" })))
      assert.is_false(is_panic(singleflight.new()))
      assert.is_false(is_panic(42))
    end)
  end)

  it("is raised for the leader and every duplicate, the same value", function()
    local g = new_group()
    local value = { reason = "backend down" }
    local s = helpers.scheduler()
    local gate = helpers.gate()
    local tasks = {}
    for i = 1, 4 do
      tasks[i] = s.go(function()
        return g:call("k", function()
          gate.wait()
          error(value)
        end)
      end)
    end
    s.round()
    gate.open()
    s.run()
    local tb = tasks[1].err.traceback
    for i = 1, 4 do
      local e = tasks[i].err
      assert.is_true(is_panic(e))
      assert.equal(value, e.value)
      assert.equal("k", e.key)
      assert.equal(tb, e.traceback)
      assert.is_nil(tasks[i].res)
    end
  end)

  it("removes the key: no stuck key after a panic", function()
    local g = new_group()
    catch(g, "k", raiser("x"))
    assert.equal(0, g:stats().inflight)
    assert.equal("fine", (g:call("k", function() return "fine" end)))
    assert.equal(2, g:stats().executions)
  end)

  it("comes from a callable table's __call too", function()
    local value = {}
    local obj = setmetatable({}, { __call = function() error(value) end })
    local e = catch(new_group(), "k", obj)
    assert.equal(value, e.value)
  end)

  it("does not touch other calls in flight", function()
    local g = new_group()
    local s = helpers.scheduler()
    local gate = helpers.gate()
    local other = s.go(function()
      return g:call("other", function()
        gate.wait()
        return "ok"
      end)
    end)
    s.round()
    catch(g, "k", raiser("x"))
    gate.open()
    s.run()
    assert.same({ n = 3, "ok", nil, false }, other.res)
  end)
end)
