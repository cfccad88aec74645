-- Values that cross Lua states: what a waiter in another
-- state (another OS thread) gets for every kind of result and panic value.
local X = require "xthreads"
local singleflight = require "singleflight"
local T = X.T
local dump = assert((loadstring or load)(X.DUMP .. "\nreturn dump"))() -- luacheck: ignore 113

local has_integers = math.type ~= nil

-- Leads a call on a fresh key whose fn returns what make() gives, while a
-- waiter in another thread joins it; returns the leader's results and what
-- the waiter's chunk `check` (given v, err, shared or ok=false, e) returned.
local function cross(make, check)
  local name = X.name("xstate")
  local g = singleflight.group(name)
  local waiter
  local r = { pcall(g.call, g, "xk", function()
    waiter = X.spawn(X.DUMP .. [[
      local name = ...
      local g = singleflight.group(name)
      local check = function(...) ]] .. check .. [[ end
      return check(pcall(g.call, g, "xk", function() return "waiter ran" end))
    ]], name)
    X.wait_until(function() return g:stats().shared >= 1 end, "waiter joined")
    return make()
  end) }
  local got = X.pack(waiter:join(X.GUARD))
  assert(got[1], "waiter failed: " .. tostring(got[2]))
  g:close()
  return r, X.unpack(got, 2, got.n)
end

-- The waiter's dump of its copy of v and err.
local function copy_of(v, err)
  local _, a, b = cross(function() return v, err end, [[
    local ok, v, err, shared = ...
    assert(ok, tostring(v))
    assert(shared == true, "shared")
    return dump(v), dump(err)
  ]])
  return a, b
end

describe("values that cross Lua states", function()
  it("copies nil, booleans, strings and numbers", function()
    for _, v in ipairs { true, false, "", "text", "nul\0in\0side", 0, 1, -7, 2^53,
                         1.5, -0.0, 1e300, math.huge, -math.huge } do
      local a, b = copy_of(v, "err")
      assert.equal(dump(v), a)
      assert.equal(dump("err"), b)
    end
    local a, b = copy_of(nil, nil)
    assert.equal("nil:nil", a)
    assert.equal("nil:nil", b)
    local nan = copy_of(0 / 0)
    assert.matches("nan", nan)
  end)

  it("keeps integers and floats apart", function()
    if not has_integers then
      return -- Lua 5.1/5.2/LuaJIT: one number type
    end
    local v = { i = 3, f = 3.0, max = math.maxinteger, min = math.mininteger,
                big = 2^63, [1] = 10, [2.5] = 20, [3.0] = 30 }
    local a = copy_of(v)
    assert.equal(dump(v), a)
    assert.matches('"f"=float:3', a, 1, true)
    assert.matches('"i"=integer:3', a, 1, true)
    assert.matches("integer:3=integer:30", a, 1, true)
  end)

  it("copies nested tables, cycles and shared subtables as such", function()
    local shared = { "s" }
    local a, b = {}, {}
    a.b, b.a = b, a
    local v = {
      list = { 1, 2, 3, { 4, { 5, { 6 } } } },
      left = shared, right = shared,
      ring = a,
      [true] = "t", [false] = "f",
      [shared] = "table as key",
    }
    v.self = v
    local got, goterr = copy_of(v, { err = shared })
    assert.equal(dump(v), got)
    -- err's subtable is v's, met again: dumped on its own it is a fresh #1
    assert.equal(dump({ err = shared }), goterr)
    -- and the structure, not only the text, from the waiter's own view
    local _, same, selfref, ring = cross(function() return v end, [[
      local ok, v = ...
      assert(ok, tostring(v))
      return rawequal(v.left, v.right), rawequal(v.self, v), rawequal(v.ring.b.a, v.ring)
    ]])
    assert.is_true(same)
    assert.is_true(selfref)
    assert.is_true(ring)
  end)

  it("keeps a table shared by v and err shared (regression: corrupt payload)", function()
    local t = { x = 1, inner = { y = 2 } }
    local _, ok, same, inner, x = cross(function() return t, t.inner end, [[
      local ok, v, err = ...
      return ok, rawequal(v.inner, err), type(err) == "table" and err.y, v.x
    ]])
    assert.is_true(ok)
    assert.is_true(same)
    assert.equal(2, inner)
    assert.equal(1, x)
    local _, ok2, same2 = cross(function() return t, t end, [[
      local ok, v, err = ...
      return ok, ok and rawequal(v, err)
    ]])
    assert.is_true(ok2)
    assert.is_true(same2)
  end)

  it("drops metatables", function()
    local mt = { __index = function() return "from meta" end }
    local v = setmetatable({ x = setmetatable({ 1 }, mt) }, mt)
    local _, text, missing, hasmt = cross(function() return v end, [[
      local ok, v = ...
      assert(ok, tostring(v))
      return dump(v), v.missing, getmetatable(v) ~= nil or getmetatable(v.x) ~= nil
    ]])
    assert.equal(dump({ x = { 1 } }), text)
    assert.is_nil(missing)
    assert.is_false(hasmt)
  end)

  it("copies light userdata", function()
    local p = T.lightuserdata(0x1234)
    local _, same, inner = cross(function() return p, { [p] = p } end, [[
      local ok, v, err = ...
      assert(ok, tostring(v))
      local T = require "sfthreads"
      local q = T.lightuserdata(0x1234)
      return v == q, err[q] == q
    ]])
    assert.is_true(same)
    assert.is_true(inner)
  end)

  it("copies a long string and a deep but finite table", function()
    local big = string.rep("0123456789abcdef", 65536) -- 1 MiB
    local deep = {}
    local t = deep
    for i = 1, 150 do
      t.next = { i = i }
      t = t.next
    end
    local _, len, ok_deep = cross(function() return big, deep end, [[
      local ok, v, err = ...
      assert(ok, tostring(v))
      local n, t = 0, err
      while t.next do n = n + 1; t = t.next end
      return #v .. ":" .. v:sub(1, 16) .. v:sub(-16), n == 150 and t.i == 150
    ]])
    assert.equal(#big .. ":" .. "0123456789abcdef0123456789abcdef", len)
    assert.is_true(ok_deep)
  end)

  it("gives the waiter an error naming the key and the type it cannot copy", function()
    local cases = {
      { function() return print end, "function" },
      { function() return { nested = { io.stdout } } end, "userdata" },
      { function() return nil, coroutine.create(function() end) end, "thread" },
    }
    for _, case in ipairs(cases) do
      local r, ok, ty, msg = cross(case[1], [[
        local ok, e = ...
        return ok, type(e), tostring(e)
      ]])
      assert.is_true(r[1]) -- the leader is unaffected
      assert.is_false(ok)
      assert.equal("string", ty)
      assert.matches('^singleflight: result for key "xk" ', msg)
      assert.matches(case[2], msg, 1, true)
    end
    -- too deep to copy is said so too
    local deep = {}
    local t = deep
    for _ = 1, 400 do
      t[1] = {}
      t = t[1]
    end
    local r, ok, _, msg = cross(function() return deep end, [[
      local ok, e = ...
      return ok, type(e), tostring(e)
    ]])
    assert.is_true(r[1])
    assert.is_false(ok)
    assert.matches('key "xk"', msg, 1, true)
    assert.matches("deep", msg, 1, true)
  end)

  describe("panic values", function()
    local function panic_of(value)
      local r, ok, is_panic, text, key, tb = cross(function() error(value, 0) end, [[
        local ok, e = ...
        assert(not ok, "no error")
        return ok, require("singleflight").is_panic(e), dump(e.value), e.key,
               type(e.traceback) == "string" and #e.traceback > 0
      ]])
      assert.is_false(r[1])
      assert.is_true(singleflight.is_panic(r[2]))
      assert.is_false(ok)
      assert.is_true(is_panic)
      assert.equal("xk", key)
      assert.is_true(tb)
      return text, r[2]
    end

    it("crosses strings, numbers, tables and nil as they are", function()
      assert.equal(dump("boom"), (panic_of("boom")))
      assert.equal(dump(42), (panic_of(42)))
      local v = { code = 7, list = { "a" } }
      v.self = v
      local text, e = panic_of(v)
      assert.equal(dump(v), text)
      assert.equal(v, e.value) -- the leader keeps its own object
      assert.equal("nil:nil", (panic_of(nil)))
    end)

    it("crosses a value that cannot cross as its text", function()
      assert.matches("^\"file %(", (panic_of(io.stdout)))
      local custom = setmetatable({ f = print },
                                  { __tostring = function() return "custom text" end })
      assert.equal(dump("custom text"), (panic_of(custom)))
      local raising = setmetatable({ f = print }, { __tostring = function() error("no") end })
      assert.matches("__tostring failed", (panic_of(raising)), 1, true)
      assert.matches("^\"function", (panic_of(print)))
    end)
  end)

  it("treats a number key and its string as one key across states", function()
    local name = X.name("numkey")
    local g = singleflight.group(name)
    local waiter
    local v = g:call(12, function()
      waiter = X.spawn([[
        local g = singleflight.group(...)
        return (g:call("12", function() return "waiter ran" end))
      ]], name)
      X.wait_until(function() return g:stats().shared >= 1 end, "waiter joined")
      return "twelve"
    end)
    assert.equal("twelve", v)
    assert.equal("twelve", X.join(waiter))
  end)

  it("keeps keys with NUL bytes apart and shares a 1 MiB key", function()
    local name = X.name("binkey")
    local g = singleflight.group(name)
    local big = string.rep("k", 1024 * 1024)
    local waiters = {}
    local v = g:call("a\0b", function()
      return g:call(big, function()
        waiters[1] = X.spawn([[
          local g = singleflight.group(...)
          return (g:call("a\0c", function() return "other key" end))
        ]], name)
        waiters[2] = X.spawn([[
          local name, big = ...
          local g = singleflight.group(name)
          return (g:call(big, function() return "waiter ran" end))
        ]], name, big)
        X.wait_until(function() return g:stats().shared >= 1 end, "waiter joined")
        return "big"
      end)
    end)
    assert.equal("big", v)
    local got = X.join_all(waiters)
    assert.equal("other key", got[1])
    assert.equal("big", got[2])
  end)
end)
