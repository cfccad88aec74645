-- The group handle: a full userdata of type singleflight.Group, closing,
-- closed handles and garbage collection.
local helpers = require "helpers"
local singleflight = require "singleflight"

local function weak()
  return setmetatable({}, { __mode = "v" })
end

describe("a group", function()
  it("is a full userdata with metatable singleflight.Group", function()
    local g = singleflight.new()
    assert.equal("userdata", type(g))
    local mt = getmetatable(g)
    assert.equal("table", type(mt))
    assert.equal("singleflight.Group", mt.__name)
    assert.equal("function", type(mt.__gc))
    assert.equal("function", type(mt.__tostring))
    assert.equal(mt, getmetatable(singleflight.new { backend = "none" }))
  end)

  it("has __close on Lua 5.4", function()
    if not helpers.lua54 then
      return
    end
    assert.equal("function", type(getmetatable(singleflight.new()).__close))
  end)

  it("has the methods call, do, forget, stats and close", function()
    local g = singleflight.new()
    for _, name in ipairs { "call", "do", "forget", "stats", "close" } do
      assert.equal("function", type(g[name]), name)
    end
  end)

  it("is a new group each time", function()
    local a, b = singleflight.new(), singleflight.new()
    assert.are_not.equal(a, b)
    assert.are_not.equal(tostring(a), tostring(b))
  end)

  it("shows its type in tostring", function()
    local g = singleflight.new()
    assert.matches("^singleflight%.Group", tostring(g))
    assert.not_matches("closed", tostring(g))
  end)

  describe("close", function()
    it("closes the handle; tostring says so", function()
      local g = singleflight.new()
      g:close()
      assert.matches("^singleflight%.Group", tostring(g))
      assert.matches("closed", tostring(g), 1, true)
    end)

    it("is harmless twice, and after __gc", function()
      local g = singleflight.new()
      g:close()
      assert.has_no.errors(function() g:close() end)
      assert.has_no.errors(function() getmetatable(g).__gc(g) end)
      local h = singleflight.new()
      getmetatable(h).__gc(h)
      assert.has_no.errors(function() h:close() end)
      assert.matches("closed", tostring(h), 1, true)
    end)

    it("makes every use an error that says the group is closed", function()
      local g = singleflight.new()
      g:close()
      local ran = false
      local function fn() ran = true end
      local uses = {
        function() return g:call("k", fn) end,
        function() return g["do"](g, "k", fn) end,
        function() return g:forget("k") end,
        function() return g:stats() end,
      }
      for _, use in ipairs(uses) do
        local ok, e = pcall(use)
        assert.is_false(ok)
        assert.equal("string", type(e))
        assert.matches("closed group", e, 1, true)
      end
      assert.is_false(ran)
    end)

    it("lets calls in flight finish for their leader and waiters", function()
      local g = singleflight.new { backend = "coroutine" }
      local s = helpers.scheduler()
      local gate = helpers.gate()
      local leader = s.go(function()
        return g:call("k", function() gate.wait() return "v" end)
      end)
      local dup = s.go(function() return g:call("k", error) end)
      s.round()
      g:close()
      gate.open()
      s.run()
      assert.same({}, s.errs)
      assert.same({ n = 3, "v", nil, true }, leader.res)
      assert.same({ n = 3, "v", nil, true }, dup.res)
      assert.is_false(pcall(g.call, g, "k", print))
    end)

    it("may be called by fn itself", function()
      local g = singleflight.new()
      local v, err, shared = g:call("k", function()
        g:close()
        return "v", "e"
      end)
      assert.same({ "v", "e", false }, { v, err, shared })
      assert.matches("closed", tostring(g), 1, true)
    end)

    it("happens at the end of a <close> scope on Lua 5.4", function()
      if not helpers.lua54 then
        return
      end
      local g = helpers.run_source([[
        local singleflight = ...
        local kept
        do
          local g <close> = singleflight.new()
          g:call("k", function() end)
          kept = g
        end
        return kept
      ]], singleflight)
      assert.matches("closed", tostring(g), 1, true)
      assert.is_false(pcall(g.stats, g))
    end)

    it("happens when a <close> scope exits by an error on Lua 5.4", function()
      if not helpers.lua54 then
        return
      end
      local box = {}
      local ok = pcall(helpers.run_source, [[
        local singleflight, box = ...
        local g <close> = singleflight.new()
        box.g = g
        error("leaving")
      ]], singleflight, box)
      assert.is_false(ok)
      assert.matches("closed", tostring(box.g), 1, true)
    end)
  end)

  describe("garbage collection", function()
    it("collects a group nobody refers to", function()
      local refs = weak()
      refs[1] = singleflight.new()
      refs[1]:call("k", function() end)
      helpers.full_gc()
      assert.is_nil(refs[1])
    end)

    it("keeps a group alive while a call in flight refers to it", function()
      local refs = weak()
      local co = coroutine.create(function()
        local g = singleflight.new { backend = "coroutine" }
        refs[1] = g
        return g:call("k", function()
          coroutine.yield()
          return "v"
        end)
      end)
      coroutine.resume(co)
      helpers.full_gc()
      assert.is_not_nil(refs[1])
      assert.equal(1, refs[1]:stats().inflight)
      assert.same({ true, "v", nil, false }, { coroutine.resume(co) })
      co = nil -- luacheck: ignore 311
      helpers.full_gc()
      assert.is_nil(refs[1])
    end)

    it("collects a group together with its suspended leader", function()
      local refs = weak()
      local co = coroutine.create(function()
        local g = singleflight.new { backend = "coroutine" }
        refs[1] = g
        return g:call("k", function()
          g:call("inner", function() coroutine.yield() end)
        end)
      end)
      coroutine.resume(co)
      refs[2] = co
      co = nil -- luacheck: ignore 311
      helpers.full_gc()
      assert.is_nil(refs[1])
      assert.is_nil(refs[2])
      -- and the state is still sound for new groups
      local g = singleflight.new()
      assert.equal("v", (g:call("k", function() return "v" end)))
    end)

    it("collects closed groups", function()
      local refs = weak()
      refs[1] = singleflight.new()
      refs[1]:close()
      helpers.full_gc()
      assert.is_nil(refs[1])
    end)

    it("keeps many groups apart and collects them all", function()
      local refs = weak()
      for i = 1, 200 do
        local g = singleflight.new()
        refs[i] = g
        assert.equal(i, (g:call(i, function() return i end)))
      end
      helpers.full_gc()
      assert.is_nil(next(refs))
    end)

    -- regression: a named group's kilobytes of C memory sat behind a
    -- small handle the collector did not weigh, so dropped handles piled up
    it("frees dropped named groups at the pace of their C memory", function()
      local named = singleflight._core.named
      helpers.full_gc()
      local before, most, rounds = named(), 0, helpers.scale(50000)
      for i = 1, rounds do
        local g = singleflight.group("dropped:" .. i) -- luacheck: ignore 211
        local n = named() - before
        if n > most then
          most = n
        end
      end
      assert.is_true(most < rounds / 10, "named groups alive at most: " .. most)
      helpers.full_gc()
      assert.equal(before, named())
    end)
  end)
end)
