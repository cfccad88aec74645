-- Keys, fn and options: what is accepted, and clear errors that change
-- nothing for the rest.
local helpers = require "helpers"
local singleflight = require "singleflight"
local unpack = table.unpack or unpack -- luacheck: ignore 143

local function new_group()
  return singleflight.new { backend = "coroutine" }
end

local ZERO = { inflight = 0, calls = 0, executions = 0, shared = 0, panics = 0,
               timeouts = 0, abandoned = 0, forgotten = 0 }

-- The error message of f(...), which must raise a string.
local function message(f, ...)
  local ok, e = pcall(f, ...)
  assert.is_false(ok, "no error raised")
  assert.equal("string", type(e))
  return e
end

-- Does a call for key2 join a call for key1 in flight?
local function same_key(key1, key2)
  local g = new_group()
  local s = helpers.scheduler()
  local gate = helpers.gate()
  local leader = s.go(function()
    return g:call(key1, function() gate.wait() return "leader" end)
  end)
  s.resume(leader.co)
  local other = s.go(function()
    return g:call(key2, function() return "other" end)
  end)
  s.resume(other.co)
  gate.open()
  s.run()
  assert.same({}, s.errs)
  return other.res[1] == "leader", leader, other
end

describe("input", function()
  describe("key", function()
    it("must be a string or a number", function()
      local g = new_group()
      local bad = { { nil, "nil" }, { true, "boolean" }, { {}, "table" },
                    { print, "function" }, { io.stdout, "userdata" },
                    { coroutine.create(function() end), "thread" } }
      for _, case in ipairs(bad) do
        local e = message(g.call, g, case[1], function() end)
        assert.matches("bad argument #1 to 'call' (string or number expected, got "
                       .. case[2] .. ")", e, 1, true)
        e = message(g.forget, g, case[1])
        assert.matches("bad argument #1 to 'forget' (string or number expected, got "
                       .. case[2] .. ")", e, 1, true)
      end
      assert.matches("bad argument #1 to 'call'", message(g.call, g), 1, true)
      assert.matches("bad argument #1 to 'forget'", message(g.forget, g), 1, true)
      assert.same(ZERO, g:stats())
    end)

    it("blames the caller of call", function()
      local g = new_group()
      local e = message(function()
        local v = g:call(nil, print)
        return v
      end)
      assert.matches("^[^\n]-06%-input_spec%.lua:%d+: bad argument #1 to 'call'", e)
    end)

    it("as a number is its shortest round-trip text: 1 and '1' are the same key", function()
      assert.is_true(same_key(1, "1"))
      assert.is_true(same_key("1", 1))
      assert.is_true(same_key(1.5, "1.5"))
      assert.is_true(same_key(-3, "-3"))
      assert.is_true(same_key(2 ^ 53, "9007199254740992"))
      assert.is_true(same_key(1e300, "1e+300"))
      assert.is_true(same_key(0.1, "0.1"))
      assert.is_true(same_key(0.1 + 0.2, "0.30000000000000004"))
      assert.is_false(same_key(1, "01"))
      assert.is_false(same_key(1, " 1"))
      assert.is_false(same_key(1, 2))
    end)

    it("an integral float is its integer: 1, 1.0 and '1' are one key on every Lua", function()
      assert.is_true(same_key(2, 2.0))
      assert.is_true(same_key(2.0, "2"))
      assert.is_true(same_key(-0.0, 0))
      assert.is_true(same_key(1e15, "1000000000000000"))
    end)

    -- regression: keys were written with %.14g, which made distinct
    -- numbers one key
    it("never makes distinct numbers one key", function()
      assert.is_false(same_key(2 ^ 53, 2 ^ 53 + 2))
      assert.is_false(same_key(0.1 + 0.2, 0.3))
      assert.is_false(same_key(1 / 3, 0.33333333333333))
      assert.is_false(same_key(123456789012345.6, 123456789012345.7))
      assert.is_false(same_key(2 ^ 63, 2 ^ 63 + 2 ^ 11))
    end)

    -- regression: NaN was the key "nan" and ±inf the keys "inf" and "-inf",
    -- one with those strings
    describe("NaN is refused, as a table index is, by every method that takes a key", function()
      local nan = 0 / 0
      local function spawn(fn, ...) fn(...) end
      -- { name, method, args, ok, expected }
      local rows = {
        { "call", "call", { nan, print }, false, "bad argument #1 to 'call' (key is NaN)" },
        { "do, Go's name for call", "do", { nan, print }, false,
          "bad argument #1 to 'call' (key is NaN)" },
        { "start", "start", { nan, print }, false, "bad argument #1 to 'start' (key is NaN)" },
        { "forget", "forget", { nan }, false, "bad argument #1 to 'forget' (key is NaN)" },
        { "call, -NaN", "call", { -nan, print }, false,
          "bad argument #1 to 'call' (key is NaN)" },
        { "call, the string \"nan\"", "call", { "nan", print }, true },
        { "forget, the string \"nan\"", "forget", { "nan" }, true },
      }
      for _, row in ipairs(rows) do
        local name, method, args, ok, expected = row[1], row[2], row[3], row[4], row[5]
        it(name, function()
          local g = singleflight.new { backend = { wait = print, wake = print, spawn = spawn } }
          local before = g:stats()
          local okn, e = pcall(function()
            local r = g[method](g, unpack(args)) -- not a tail call: this line is blamed
            return r
          end)
          assert.equal(ok, okn, tostring(e))
          if not ok then
            assert.equal("string", type(e))
            assert.matches(expected, e, 1, true)
            assert.matches("^[^\n]-06%-input_spec%.lua:%d+: bad argument", e)
            assert.same(before, g:stats())
          end
        end)
      end
    end)

    it("±inf is the text Lua writes for it, \"1e9999\" and \"-1e9999\": not \"inf\"", function()
      assert.is_true(same_key(math.huge, "1e9999"))
      assert.is_true(same_key(-math.huge, "-1e9999"))
      assert.is_true(same_key(1e999, math.huge))
      assert.is_false(same_key(math.huge, "inf"))
      assert.is_false(same_key(-math.huge, "-inf"))
      assert.is_false(same_key(math.huge, -math.huge))
      assert.is_false(same_key("nan", "-nan"))
      local g = new_group()
      for _, v in ipairs { math.huge, -math.huge } do
        local ok, e = pcall(g.call, g, v, error, "x")
        assert.is_false(ok)
        assert.equal(v, tonumber(e.key)) -- reads back as the same number
        assert.equal(v > 0 and "1e9999" or "-1e9999", e.key)
      end
      assert.is_false(g:forget(math.huge))
    end)

    it("is binary-safe: NUL bytes count", function()
      assert.is_true(same_key("a\0b", "a\0" .. "b"))
      assert.is_false(same_key("a\0b", "a\0c"))
      assert.is_false(same_key("a", "a\0"))
      assert.is_false(same_key("\0", ""))
      assert.is_true(same_key("\0\0", "\0\0"))
      assert.is_true(same_key("\255\254", "\255\254"))
    end)

    it("may be empty", function()
      local g = new_group()
      assert.equal("e", (g:call("", function() return "e" end)))
      assert.is_true(same_key("", ""))
    end)

    it("may be 1 MiB long", function()
      local n = 1024 * 1024
      local key = string.rep("k", n - 1) .. "\0"
      local copy = string.rep("k", n - 2) .. "k\0"
      local other = string.rep("k", n)
      assert.is_true(same_key(key, copy))
      assert.is_false(same_key(key, other))
      local g = new_group()
      local v, _, shared = g:call(key, function(...) return select("#", ...) end, 1, 2)
      assert.equal(2, v)
      assert.is_false(shared)
      local ok, e = pcall(g.call, g, key, function() error("x") end)
      assert.is_false(ok)
      assert.equal(key, e.key)
    end)

    it("is shown short in messages when long", function()
      local key = string.rep("k", 1024 * 1024)
      local g = new_group()
      local inner
      g:call(key, function()
        inner = message(g.call, g, key, print)
      end)
      assert.matches("^singleflight: recursive call for key \"kkkk", inner)
      assert.is_true(#inner < 200)
      assert.matches("1048576", inner, 1, true)
    end)
  end)

  describe("fn", function()
    it("must be a function or a callable value", function()
      local g = new_group()
      local bad = { { nil, "nil" }, { 1, "number" }, { "f", "string" },
                    { {}, "table" }, { true, "boolean" },
                    { setmetatable({}, { __index = function() end }), "table" } }
      for _, case in ipairs(bad) do
        local e = message(g.call, g, "k", case[1])
        assert.matches("bad argument #2 to 'call' (function or callable value expected, got "
                       .. case[2] .. ")", e, 1, true)
      end
      assert.matches("bad argument #2 to 'call'", message(g.call, g, "k"), 1, true)
      assert.same(ZERO, g:stats())
    end)

    it("may be a C function", function()
      local g = new_group()
      assert.same({ 3, nil, false }, { g:call("k", math.max, 1, 3, 2) })
      assert.same({ "ab", nil, false }, { g:call("k", string.rep, "ab", 1) })
      local ok, e = pcall(g.call, g, "k", error, "from C", 0)
      assert.is_false(ok)
      assert.is_true(singleflight.is_panic(e))
      assert.equal("from C", e.value)
      assert.equal(0, g:stats().inflight)
    end)
  end)

  it("that is bad changes nothing for a call in flight", function()
    local g = new_group()
    local s = helpers.scheduler()
    local gate = helpers.gate()
    local leader = s.go(function()
      return g:call("k", function() gate.wait() return "v" end)
    end)
    s.resume(leader.co)
    local dup = s.go(function()
      assert(not pcall(g.call, g, "k", nil))
      assert(not pcall(g.call, g, nil, print))
      assert(not pcall(g.forget, g, {}))
      return g:call("k", error)
    end)
    s.round()
    gate.open()
    s.run()
    assert.same({}, s.errs)
    assert.same({ n = 3, "v", nil, true }, leader.res)
    assert.same({ n = 3, "v", nil, true }, dup.res)
    local st = g:stats()
    assert.equal(2, st.calls)
    assert.equal(1, st.shared)
  end)

  describe("self", function()
    -- Regression: on 5.1 and LuaJIT the errors named internal functions
    -- ('acquire', '?') and blamed the library's own file.
    it("must be a group, and the error says which method", function()
      local g = new_group()
      local bad = { { nil, "nil" }, { 1, "number" }, { "g", "string" }, { {}, "table" },
                    { io.stdout, "userdata" } }
      for _, case in ipairs(bad) do
        local tail = "(singleflight.Group expected, got " .. case[2] .. ")"
        assert.matches("bad argument #1 to 'call' " .. tail,
                       message(g.call, case[1], "k", print), 1, true)
        assert.matches("bad argument #1 to 'call' " .. tail,
                       message(g["do"], case[1], "k", print), 1, true)
        assert.matches("bad argument #1 to 'forget' " .. tail,
                       message(g.forget, case[1], "k"), 1, true)
        assert.matches("bad argument #1 to 'stats' " .. tail,
                       message(g.stats, case[1]), 1, true)
      end
      assert.same(ZERO, g:stats())
    end)

    it("errors blame the caller", function()
      local g = new_group()
      local e = message(function()
        local v = g.call("k", print)
        return v
      end)
      assert.matches("^[^\n]-06%-input_spec%.lua:%d+: bad argument #1 to 'call'", e)
    end)
  end)

  describe("options", function()
    local function option_error(opts)
      return message(singleflight.new, opts)
    end

    it("may be absent or empty", function()
      assert.is_userdata(singleflight.new())
      assert.is_userdata(singleflight.new(nil))
      assert.is_userdata(singleflight.new {})
    end)

    it("must be a table", function()
      for _, v in ipairs { "x", 1, true, print } do
        assert.matches("bad argument #1 to 'new' (table expected, got " .. type(v) .. ")",
                       option_error(v), 1, true)
      end
    end)

    it("accept the documented values", function()
      local ok_values = {
        { timeout = 0 }, { timeout = 0.25 }, { timeout = 10 }, { timeout = math.huge },
        { timeout = 1, on_timeout = "error" }, { timeout = 1, on_timeout = "run" },
        { backend = "auto" }, { backend = "coroutine" }, { backend = "none" },
        -- "ngx", "cqueues", "copas" where they can work: 16-options_spec.lua
        { backend = { wait = print, wake = print } },
        { backend = { wait = print, wake = print, new = print, can_wait = print,
                      spawn = print } },
        { timeout = 1, on_timeout = "run", backend = "coroutine" },
      }
      for _, opts in ipairs(ok_values) do
        assert.is_userdata(singleflight.new(opts))
      end
    end)

    it("reject a bad timeout, naming it", function()
      for _, v in ipairs { "1", -1, -0.5, true, {} } do
        assert.matches("bad option 'timeout' to 'new'", option_error { timeout = v }, 1, true)
      end
      assert.matches("bad option 'timeout' to 'new'", option_error { timeout = 0 / 0 }, 1, true)
    end)

    it("reject a bad on_timeout, naming it", function()
      for _, v in ipairs { "ERROR", "retry", 1, true, {} } do
        assert.matches("bad option 'on_timeout' to 'new'", option_error { on_timeout = v },
                       1, true)
      end
    end)

    it("reject a bad backend, naming it", function()
      for _, v in ipairs { "nginx", "", 1, true, print, {},
                           { wait = print }, { wake = print },
                           { wait = print, wake = "x" },
                           { wait = print, wake = print, new = 1 },
                           { wait = print, wake = print, can_wait = true },
                           { wait = print, wake = print, spawn = "f" } } do
        assert.matches("bad option 'backend' to 'new'", option_error { backend = v }, 1, true)
      end
    end)

    it("reject unknown names, naming them", function()
      assert.matches("bad option 'timout' to 'new'", option_error { timout = 1 }, 1, true)
      assert.matches("bad option 'Backend' to 'new'", option_error { Backend = "none" },
                     1, true)
      assert.matches("bad option '1' to 'new'", option_error { "coroutine" }, 1, true)
    end)

    -- Regression: a bad backend table blamed the library's own file.
    it("errors blame the caller of new", function()
      local cases = { { timeout = -1 }, { backend = "x" }, { backend = {} },
                      { backend = { wait = print, wake = print, new = 1 } }, { nope = 1 } }
      for _, opts in ipairs(cases) do
        local e = message(function()
          local g = singleflight.new(opts)
          return g
        end)
        assert.matches("^[^\n]-06%-input_spec%.lua:%d+: bad option", e)
      end
      local e = message(function()
        local g = singleflight.new(1)
        return g
      end)
      assert.matches("^[^\n]-06%-input_spec%.lua:%d+: bad argument #1 to 'new'", e)
    end)
  end)
end)

-- The binding's one entry point for the Lua layer's functions: what it
-- refuses changes nothing, and it gives back what it replaced.
describe("core.interpose", function()
  local core = require "singleflight.core"

  it("refuses what is not a table it keeps, a holder's finalizer, or a function",
     function()
    local g = singleflight.new { backend = "coroutine" }
    local call = g.call
    for _, args in ipairs {
      { "group", "call", function() end },
      { "Guard", "__index", function() end },
      { "Ref", "wait", function() end },
      { "methods", "call", "not a function" },
      { "methods", nil, function() end },
    } do
      local ok, e = pcall(core.interpose, args[1], args[2], args[3])
      assert.is_false(ok)
      assert.matches("^bad argument #%d to '[^']*' %(", e)
    end
    assert.equal(call, g.call)
    assert.equal("v", (g:call("k", function() return "v" end)))
  end)

  it("gives back the function it replaces, which a second call puts back", function()
    local g = singleflight.new()
    local call = g.call
    local function mine() return "mine" end
    assert.equal(call, core.interpose("methods", "call", mine))
    assert.equal("mine", g:call("k", function() return "v" end))
    assert.equal(mine, core.interpose("methods", "call", call))
    assert.equal("v", (g:call("k", function() return "v" end)))
  end)
end)
