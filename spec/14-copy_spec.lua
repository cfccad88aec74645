-- The value copier as strings (core.encode / core.decode): what crosses
-- nginx workers and machines, by the rules of values crossing Lua states.
local singleflight = require "singleflight"
local core = singleflight._core

local function round(ok, a, b)
  local bytes = assert(core.encode(ok, a, b))
  assert.is_string(bytes)
  return core.decode(bytes)
end

describe("core.encode and core.decode", function()
  it("carry a result: nil, booleans, numbers, strings, light userdata", function()
    for _, v in ipairs { true, false, 0, -7, 1.5, 2^53, "", "nul\0in", 1e300 } do
      local ok, a, b = round(true, v, "err")
      assert.is_true(ok)
      assert.equal(v, a)
      assert.equal("err", b)
    end
    local ok, a, b = round(true, nil, nil)
    assert.same({ true, nil, nil }, { ok, a, b })
  end)

  it("keep integers and floats apart where Lua does", function()
    if not math.type then
      return
    end
    local _, i = round(true, 3)
    local _, f = round(true, 3.0)
    assert.equal("integer", math.type(i))
    assert.equal("float", math.type(f))
  end)

  it("carry tables with cycles and shared subtables, metatables dropped", function()
    local shared = { "s" }
    local t = setmetatable({ a = shared, b = shared, n = { 1, 2 } }, { __index = print })
    t.self = t
    local _, c, e = round(true, t, shared)
    assert.equal(c, c.self)
    assert.equal(c.a, c.b)
    assert.equal(c.a, e) -- err refers to a table of v
    assert.same({ 1, 2 }, c.n)
    assert.is_nil(getmetatable(c))
  end)

  it("refuse a result that cannot cross, naming the type", function()
    for _, v in ipairs { print, coroutine.create(function() end), io.stdout, { f = print } } do
      local bytes, why = core.encode(true, v, nil)
      assert.is_nil(bytes)
      assert.is_string(why)
    end
    assert.same({ nil, "function" }, { core.encode(true, print) })
  end)

  -- regression: the panic value's text overwrote the kind byte, and decode
  -- called the bytes corrupt
  it("carry a panic whose value cannot cross as its text, with its traceback", function()
    local ok, a, b = round(false, print, "the traceback")
    assert.is_false(ok)
    assert.matches("^function: ", a)
    assert.equal("the traceback", b)
    local ok2, a2 = round(false, setmetatable({}, { __tostring = function() return "custom" end,
                                                     __index = { f = print } }), "tb")
    assert.is_false(ok2)
    assert.is_table(a2) -- a table crosses as a table, metatable dropped
    local ok3, a3 = round(false, { print }, "tb")
    assert.is_false(ok3)
    assert.matches("^table: ", a3)
  end)

  it("refuse bytes they did not make", function()
    for _, bad in ipairs { "", "x", "\0", "\0s", "\0T\0\0\0\0", string.rep("\0", 50) } do
      local okd, e = pcall(core.decode, bad)
      assert.is_false(okd, ("%q"):format(bad))
      assert.matches("corrupt payload", e)
    end
    assert.has_error(function() core.decode(42) end)
  end)

  it("refuse nesting deeper than 200 tables", function()
    local deep = {}
    local t = deep
    for _ = 1, 300 do
      t[1] = {}
      t = t[1]
    end
    local bytes, why = core.encode(true, deep)
    assert.is_nil(bytes)
    assert.matches("deep", why)
  end)
end)
