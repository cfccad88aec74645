-- A leader whose g:call is made inside a metamethod or a for-in iterator,
-- and whose fn yields. Lua 5.1 can't yield there (the VM calls those from
-- C): the call ends in a panic shared by every caller, the key freed, as
-- when fn yields inside a metamethod of its own. Lua 5.2 and later and
-- LuaJIT can: the yield passes up to the scheduler and the call goes on.
-- Ordinary calls (tail calls, calls of unnamed expressions, __call) are
-- no boundary anywhere.
describe("a leader called inside a metamethod or an iterator, fn yielding", function()
  local singleflight = require "singleflight"
  local helpers = require "helpers"
  local pack = helpers.pack

  local LUA51 = helpers.lua51
  local YIELD_ERROR = "attempt to yield across metamethod/C-call boundary"
  local newproxy = rawget(_G, "newproxy")

  -- Each context calls lead() (which makes the g:call) its own way and
  -- returns what it gave. boundary: Lua 5.1 can't yield across it.
  local contexts = {}
  local function context(name, boundary, fn)
    contexts[#contexts + 1] = { name = name, boundary = boundary, fn = fn }
  end

  local function binary(event, run)
    return function(lead)
      local got
      local mt = {}
      mt[event] = function()
        got = lead()
        return true
      end
      run(setmetatable({}, mt), setmetatable({}, mt))
      return got
    end
  end

  context("__index", true, function(lead)
    return setmetatable({}, { __index = function() return (lead()) end }).key
  end)
  context("__index, through a tail call", true, function(lead)
    local t = setmetatable({}, { __index = function() return lead() end })
    local v = t.key
    return v
  end)
  context("__index of the globals", true, function(lead)
    if not setfenv then
      return lead() -- 5.2+: _ENV's __index, tested by __index above
    end
    local f = setfenv(function() return undefined_global end, -- luacheck: ignore 113
                      setmetatable({}, { __index = function() return (lead()) end }))
    return f()
  end)
  context("__newindex", true, function(lead)
    local got
    setmetatable({}, { __newindex = function() got = lead() end }).key = 1
    return got
  end)
  context("__add", true, binary("__add", function(a) return a + 1 end))
  context("__concat", true, binary("__concat", function(a) return "x" .. a end))
  context("__eq", true, binary("__eq", function(a, b) return a == b end))
  context("__lt", true, binary("__lt", function(a, b) return a < b end))
  context("__le", true, binary("__le", function(a, b) return a <= b end))
  context("__unm", true, binary("__unm", function(a) return -a end))
  context("__len", true, function(lead)
    local got
    local obj = newproxy and newproxy(true) or setmetatable({}, {})
    getmetatable(obj).__len = function()
      got = lead()
      return 0
    end
    local _ = #obj
    return got
  end)
  context("a for-in iterator", true, function(lead)
    local got
    for v in function(_, last) if not last then return (lead()) end end do
      got = v
    end
    return got
  end)
  context("a for-in iterator, through a tail call", true, function(lead)
    local got
    for _, v in ipairs { 1 } do
      for w in function(_, last) if not last then return lead() end end do
        got = w and v and w
      end
    end
    return got
  end)
  context("a metamethod, several calls down", true, function(lead)
    local function down(n) if n == 0 then return (lead()) end return (down(n - 1)) end
    return setmetatable({}, { __index = function() return (down(3)) end }).key
  end)
  -- no boundary
  context("a plain call", false, function(lead) return (lead()) end)
  context("a tail call", false, function(lead) return lead() end)
  context("a call of an unnamed expression", false, function(lead)
    return ((function() return lead end)())()
  end)
  context("__call", false, function(lead)
    return setmetatable({}, { __call = function() return (lead()) end })()
  end)
  context("the body of a for-in loop", false, function(lead)
    local got
    for _ in ipairs { 1 } do
      got = lead()
    end
    return got
  end)
  context("the explist of a for-in loop", false, function(lead)
    local got
    for _, v in ipairs { (lead()) } do
      got = v
    end
    return got
  end)

  -- A leader of key "k" in coroutine `leader` calls through ctx. Its fn
  -- first resumes `dup`, a same-state duplicate that joins and waits
  -- (backend "coroutine"), then yields once.
  local function run(ctx, own_metamethod)
    local g = singleflight.new { backend = "coroutine" }
    local dup_ran = false
    local dup = coroutine.create(function()
      return g:call("k", function() dup_ran = true return "dup" end)
    end)
    local function fn()
      assert(coroutine.resume(dup))
      assert.equal(1, g:stats().shared)
      if own_metamethod then
        return setmetatable({}, { __index = function()
          coroutine.yield("from fn")
          return "v"
        end }).key
      end
      coroutine.yield("from fn")
      return "v"
    end
    local got
    local leader = coroutine.create(function()
      got = ctx(function() return g:call("k", fn) end)
      return "leader done"
    end)
    return {
      g = g, dup = dup, leader = leader,
      first = pack(coroutine.resume(leader)),
      got = function() return got end,
      dup_ran = function() return dup_ran end,
    }
  end

  local function assert_shared_panic(r)
    local ok, e = r.first[1], r.first[2]
    assert.is_false(ok)
    assert.equal("dead", coroutine.status(r.leader))
    assert.is_true(singleflight.is_panic(e), tostring(e))
    assert.equal(YIELD_ERROR, e.value)
    assert.equal("k", e.key)
    assert.matches("singleflight: " .. YIELD_ERROR, tostring(e), 1, true)
    local st = r.g:stats()
    assert.equal(0, st.inflight)
    assert.equal(1, st.panics)
    -- the duplicate waiting on the key gets the same panic
    local dok, de = coroutine.resume(r.dup)
    assert.is_false(dok)
    assert.equal(e, de)
    assert.is_false(r.dup_ran())
    st = r.g:stats()
    assert.equal(2, st.calls)
    assert.equal(1, st.executions)
    assert.equal(1, st.shared)
    assert.equal(0, st.inflight)
    -- the next call of the key starts afresh
    assert.same({ n = 3, "fresh", nil, false },
                pack(r.g:call("k", function() return "fresh" end)))
  end

  local function assert_passed(r)
    assert.same({ n = 2, true, "from fn" }, r.first)
    assert.equal(1, r.g:stats().inflight)
    assert.same({ n = 2, true, "leader done" }, pack(coroutine.resume(r.leader)))
    assert.equal("v", r.got())
    assert.same({ n = 4, true, "v", nil, true }, pack(coroutine.resume(r.dup)))
    assert.is_false(r.dup_ran())
  end

  for _, c in ipairs(contexts) do
    local expect = (LUA51 and c.boundary) and "a shared panic, the key freed"
                   or "the yield passes up"
    it("inside " .. c.name .. ": " .. expect, function()
      local r = run(c.fn)
      if LUA51 and c.boundary then
        assert_shared_panic(r)
      else
        if r.first[1] then
          assert_passed(r)
        else
          error(r.first[2], 0)
        end
        local st = r.g:stats()
        assert.equal(0, st.inflight)
        assert.equal(0, st.panics)
        assert.equal(1, st.executions)
        assert.equal(1, st.shared)
      end
    end)
  end

  it("the same panic as fn yielding inside a metamethod of its own", function()
    local r = run(function(lead) return (lead()) end, true)
    if LUA51 then
      assert_shared_panic(r)
    else
      assert_passed(r)
    end
  end)

  it("a leader nested in another, under a metamethod: both keys freed", function()
    local g = singleflight.new { backend = "coroutine" }
    local inner = function()
      coroutine.yield("inner")
      return "inner v"
    end
    local outer = function()
      return (g:call("inner", inner)) .. " via outer"
    end
    local t = setmetatable({}, { __index = function(_, k) return (g:call(k, outer)) end })
    local got
    local co = coroutine.create(function() got = t.outer end)
    local ok, e = coroutine.resume(co)
    if LUA51 then
      assert.is_false(ok)
      assert.is_true(singleflight.is_panic(e))
      assert.equal("outer", e.key)
      -- the inner call's panic, raised in the outer fn, became its value
      assert.is_true(singleflight.is_panic(e.value))
      assert.equal("inner", e.value.key)
      assert.equal(YIELD_ERROR, e.value.value)
      assert.equal(2, g:stats().panics)
    else
      assert.same({ true, "inner" }, { ok, e })
      assert.same({ true }, { coroutine.resume(co) })
      assert.equal("inner v via outer", got)
    end
    assert.equal(0, g:stats().inflight)
    assert.same({ n = 3, "again", nil, false },
                pack(g:call("outer", function() return "again" end)))
    assert.same({ n = 3, "again", nil, false },
                pack(g:call("inner", function() return "again" end)))
  end)
end)
