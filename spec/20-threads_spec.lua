-- Process-wide groups used from several Lua states, each in its own OS
-- thread (the helper module is sfthreads).
local X = require "xthreads"
local singleflight = require "singleflight"
local T = X.T

describe("a process-wide group across OS threads", function()
  it("gives N threads x W waves exactly W executions and equal copies", function()
    local N, W = 6, 30
    local name = X.name("waves")
    local g = singleflight.group(name)
    local start = T.barrier(N)
    local ts = {}
    for i = 1, N do
      ts[i] = X.spawn([[
        local name, id, N, W, start = ...
        local g = singleflight.group(name)
        local got = {}
        for w = 1, W do
          assert(start:wait(GUARD), "barrier")
          local v, err, shared = g:call("k", function()
            -- hold the call until every other thread has joined it
            wait_until(function() return g:stats().shared >= w * (N - 1) end, "joiners")
            return { wave = w, by = id, list = { w, w * 2, { deep = "d" .. w } } }, "e" .. w
          end)
          got[w] = string.format("%d %d %d %d %s %s %s", v.wave, v.by, v.list[1],
                                 v.list[2], v.list[3].deep, err, tostring(shared))
        end
        return got
      ]], name, i, N, W, start)
    end
    local got = X.join_all(ts)
    for w = 1, W do
      local first = got[1][w]
      assert.matches("^" .. w .. " %d+ " .. w .. " " .. 2 * w .. " d" .. w .. " e" .. w
                     .. " true$", first)
      for i = 2, N do
        assert.equal(first, got[i][w])
      end
    end
    local st = g:stats()
    assert.equal(W, st.executions)
    assert.equal(N * W, st.calls)
    assert.equal(W * (N - 1), st.shared)
    assert.equal(0, st.inflight)
    g:close()
  end)

  it("copies a raised table into every thread's panic error", function()
    local N = 4
    local name = X.name("panic")
    local g = singleflight.group(name) -- keeps the group and its counts alive
    local ts = {}
    for i = 1, N do
      ts[i] = X.spawn([[
        local name, id, N = ...
        local g = singleflight.group(name)
        local mine = { code = 42, by = id, nested = { list = { "a", "b" } } }
        local ok, e = pcall(g.call, g, "pk", function()
          wait_until(function() return g:stats().shared >= N - 1 end, "joiners")
          error(mine)
        end)
        assert(not ok, "no error")
        assert(singleflight.is_panic(e), "not a panic error: " .. tostring(e))
        assert(type(e.traceback) == "string" and #e.traceback > 0, "no traceback")
        assert(tostring(e):sub(1, 14) == "singleflight: ", tostring(e))
        return table.concat({ e.key, tostring(e.value.code), tostring(e.value.by),
                              e.value.nested.list[1] .. e.value.nested.list[2],
                              tostring(rawequal(e.value, mine)),
                              tostring(getmetatable(e.value) == nil) }, " ")
      ]], name, i, N)
    end
    local got = X.join_all(ts)
    local leaders = 0
    local by = got[1]:match("^pk 42 (%d+) ab")
    assert.is_truthy(by)
    for i = 1, N do
      local mine = got[i]:match(" (%a+) true$")
      if mine == "true" then
        leaders = leaders + 1
        assert.equal(tostring(i), by) -- the leader's own table, not a copy
      end
      assert.equal("pk 42 " .. by .. " ab " .. mine .. " true", got[i])
    end
    assert.equal(1, leaders)
    local st = g:stats()
    assert.equal(1, st.executions)
    assert.equal(1, st.panics)
  end)

  it("gives a foreign waiter with a timeout TIMEOUT, or runs fn with on_timeout='run'", function()
    local name = X.name("timeout")
    local g = singleflight.group(name)
    local done = T.cell(0)
    local ts = {}
    local v, err, shared = g:call("tk", function()
      ts[1] = X.spawn([[
        local name, done = ...
        local g = singleflight.group(name, { timeout = 0.05 })
        local v, err, shared = g:call("tk", function() return "not me" end)
        done:add(1)
        return string.format("%s|%s|%s", tostring(v), tostring(err), tostring(shared))
      ]], name, done)
      ts[2] = X.spawn([[
        local name, done = ...
        local g = singleflight.group(name, { timeout = 0.05, on_timeout = "run" })
        local v, err, shared = g:call("tk", function(a) return "own " .. a, "e" end, "arg")
        done:add(1)
        return string.format("%s|%s|%s", tostring(v), tostring(err), tostring(shared))
      ]], name, done)
      X.wait_until(function() return done:get() >= 2 end, "waiters")
      return "leader"
    end)
    assert.equal("leader", v)
    assert.is_nil(err)
    assert.is_true(shared) -- duplicates joined, though both gave up
    local got = X.join_all(ts)
    assert.equal("nil|" .. singleflight.TIMEOUT .. "|false", got[1])
    assert.equal("own arg|e|false", got[2])
    local st = g:stats()
    assert.equal(3, st.calls)
    assert.equal(2, st.executions)
    assert.equal(2, st.timeouts)
    assert.equal(0, st.inflight)
  end)

  it("keeps each state's own options on one named group", function()
    local name = X.name("options")
    local quick = singleflight.group(name, { timeout = 0 })
    local leading, release = T.cell(0), T.cell(0)
    local leader = X.spawn([[
      local name, leading, release = ...
      local g = singleflight.group(name)
      return (g:call("ok", function()
        leading:set(1)
        assert(release:wait(1, GUARD))
        return "slow value"
      end))
    ]], name, leading, release)
    assert.is_true(leading:wait(1, X.GUARD))
    local patient = X.spawn([[
      local g = singleflight.group(...) -- no timeout here
      return (g:call("ok", function() return "patient ran" end))
    ]], name)
    X.wait_until(function() return quick:stats().shared >= 1 end, "patient joined")
    local v, err, shared = quick:call("ok", function() return "quick ran" end)
    assert.is_nil(v)
    assert.equal(singleflight.TIMEOUT, err)
    assert.is_false(shared)
    assert.equal(1, quick:stats().timeouts)
    release:set(1)
    assert.equal("slow value", X.join(leader))
    assert.equal("slow value", X.join(patient))
  end)

  it("gives the leader a function result and foreign waiters a clear error", function()
    local name = X.name("fnresult")
    local g = singleflight.group(name)
    local waiters = {}
    local f = function() end
    local v, err, shared = g:call("fk", function()
      for i = 1, 2 do
        waiters[i] = X.spawn([[
          local name = ...
          local g = singleflight.group(name)
          local ok, e = pcall(g.call, g, "fk", function() return "ran" end)
          return string.format("%s|%s|%s", tostring(ok), type(e), tostring(e))
        ]], name)
      end
      X.wait_until(function() return g:stats().shared >= 2 end, "waiters")
      return f, "err"
    end)
    assert.equal(f, v)
    assert.equal("err", err)
    assert.is_true(shared)
    for _, got in ipairs(X.join_all(waiters)) do
      local ok, ty, msg = got:match("^(%a+)|(%a+)|(.*)$")
      assert.equal("false", ok)
      assert.equal("string", ty)
      assert.matches('key "fk"', msg, 1, true)
      assert.matches("function", msg, 1, true)
      assert.matches("^singleflight: ", msg)
    end
    -- a full userdata nested in a table is named as well
    local w2
    g:call("uk", function()
      w2 = X.spawn([[
        local g = singleflight.group(...)
        local ok, e = pcall(g.call, g, "uk", function() return "ran" end)
        return tostring(ok) .. "|" .. tostring(e)
      ]], name)
      X.wait_until(function() return g:stats().shared >= 3 end, "waiter")
      return { ok = { io.stdout } }
    end)
    local got = X.join(w2)
    assert.matches('^false|singleflight: .*key "uk".*userdata', got)
  end)

  it("forgets across threads: waiters keep the old call, later callers start anew", function()
    local name = X.name("forget")
    local g = singleflight.group(name)
    local leading1, release1 = T.cell(0), T.cell(0)
    local leading2, release2 = T.cell(0), T.cell(0)
    local src = [[
      local name, value, leading, release = ...
      local g = singleflight.group(name)
      local v, _, shared = g:call("fg", function()
        if leading then leading:set(1) end
        if release then assert(release:wait(1, GUARD)) end
        return value
      end)
      return v .. " " .. tostring(shared)
    ]]
    local a = X.spawn(src, name, "first", leading1, release1)
    assert.is_true(leading1:wait(1, X.GUARD))
    local b = X.spawn(src, name, "b ran")
    X.wait_until(function() return g:stats().shared >= 1 end, "b joined")
    assert.is_true(g:forget("fg"))
    assert.is_false(g:forget("fg"))
    local c = X.spawn(src, name, "second", leading2, release2)
    assert.is_true(leading2:wait(1, X.GUARD))
    release1:set(1) -- the forgotten call ends; it must not remove its successor
    assert.equal("first true", X.join(a))
    assert.equal("first true", X.join(b))
    local d = X.spawn(src, name, "d ran")
    X.wait_until(function() return g:stats().shared >= 2 end, "d joined")
    release2:set(1)
    assert.equal("second true", X.join(c))
    assert.equal("second true", X.join(d))
    local st = g:stats()
    assert.equal(2, st.executions)
    assert.equal(1, st.forgotten)
    assert.equal(0, st.inflight)
  end)

  it("serves coroutine waiters in its own state and waiters in other states", function()
    local K, M = 5, 3
    local name = X.name("mixed")
    local g = singleflight.group(name)
    local leading = T.cell(0)
    local leader = X.spawn([[
      local name, K, M, leading = ...
      local g = singleflight.group(name, { backend = "coroutine" })
      local results, cos = {}, {}
      local mine
      for i = 1, K do
        cos[i] = coroutine.create(function()
          local v, err, shared = g:call("mx", function()
            mine = { from = "leader state" }
            leading:set(1)
            while g:stats().shared < (K - 1) + M do coroutine.yield() T.sleep(0.0002) end
            return mine, "e"
          end)
          results[i] = { v = v, err = err, shared = shared }
        end)
      end
      for _ = 1, 10 * GUARD / 0.0002 do
        local alive = false
        for i = 1, K do
          if coroutine.status(cos[i]) ~= "dead" then
            assert(coroutine.resume(cos[i]))
            alive = alive or coroutine.status(cos[i]) ~= "dead"
          end
        end
        if not alive then break end
      end
      local same = 0
      for i = 1, K do
        local r = results[i]
        assert(r, "coroutine " .. i .. " got nothing")
        if rawequal(r.v, mine) and r.err == "e" and r.shared == true then
          same = same + 1
        end
      end
      return same
    ]], name, K, M, leading)
    assert.is_true(leading:wait(1, X.GUARD))
    local foreign = {}
    for i = 1, M do
      foreign[i] = X.spawn([[
        local g = singleflight.group(...)
        local v, err, shared = g:call("mx", function() return { from = "foreign" } end)
        return v.from .. "|" .. err .. "|" .. tostring(shared)
      ]], name)
    end
    for _, got in ipairs(X.join_all(foreign)) do
      assert.equal("leader state|e|true", got)
    end
    assert.equal(K, X.join(leader))
    local st = g:stats()
    assert.equal(1, st.executions)
    assert.equal(K + M, st.calls)
  end)

  it("hands a call over to a foreign waiter when the leader's state is closed", function()
    local name = X.name("closed-state")
    local g = singleflight.group(name)
    local leading = T.cell(0)
    local leader = X.spawn([[
      local name, leading = ...
      local g = singleflight.group(name)
      local co = coroutine.create(function()
        return g:call("ab", function()
          leading:set(1)
          coroutine.yield() -- never resumed: the state closes first
          return "never"
        end)
      end)
      assert(coroutine.resume(co))
      wait_until(function() return g:stats().shared >= 1 end, "waiter joined")
      return "closing" -- the thread closes this state with the call in flight
    ]], name, leading)
    assert.is_true(leading:wait(1, X.GUARD))
    local waiter = X.spawn([[
      local g = singleflight.group(...)
      local v, err, shared = g:call("ab", function(x) return "mine " .. x end, "arg")
      return string.format("%s|%s|%s", v, tostring(err), tostring(shared))
    ]], name)
    assert.equal("closing", X.join(leader))
    assert.equal("mine arg|nil|false", X.join(waiter))
    local st = g:stats()
    assert.equal(1, st.abandoned)
    assert.equal(2, st.executions)
    assert.equal(2, st.calls)
    assert.equal(0, st.inflight)
  end)

  it("hands a call over when the leader's coroutine is collected", function()
    local name = X.name("collected")
    local g = singleflight.group(name)
    local leading, waiting, again = T.cell(0), T.cell(0), T.cell(0)
    local leader = X.spawn([[
      local name, leading, waiting, again = ...
      local g = singleflight.group(name)
      local co = coroutine.create(function()
        return g:call("gc", function()
          leading:set(1)
          coroutine.yield()
          return "never"
        end)
      end)
      assert(coroutine.resume(co))
      assert(waiting:wait(1, GUARD))
      wait_until(function() return g:stats().shared >= 2 end, "waiters joined")
      co = nil -- luacheck: ignore
      collectgarbage()
      collectgarbage()
      assert(again:wait(2, GUARD))
      return g:stats().abandoned
    ]], name, leading, waiting, again)
    assert.is_true(leading:wait(1, X.GUARD))
    local src = [[
      local name, waiting, again = ...
      local g = singleflight.group(name)
      waiting:add(1)
      local v, _, shared = g:call("gc", function() return "new leader" end)
      again:add(1)
      return v .. "|" .. tostring(shared)
    ]]
    local w1 = X.spawn(src, name, waiting, again)
    local w2 = X.spawn(src, name, waiting, again)
    local a, b = X.join(w1), X.join(w2)
    assert.equal(1, X.join(leader))
    -- one waiter became the leader, the other joined it (or came later)
    assert.matches("^new leader|", a)
    assert.matches("^new leader|", b)
    local st = g:stats()
    assert.equal(1, st.abandoned)
    assert.equal(0, st.inflight)
  end)

  it("survives a group handle closed or collected while calls are in flight", function()
    local name = X.name("handle")
    local h = singleflight.group(name)
    local leading, release = T.cell(0), T.cell(0)
    local leader = X.spawn([[
      local name, leading, release = ...
      local g = singleflight.group(name)
      local v = g:call("hk", function()
        g:close()        -- the handle this very call came through
        collectgarbage()
        leading:set(1)
        assert(release:wait(1, GUARD))
        return "value"
      end)
      local ok, e = pcall(g.call, g, "hk", function() end)
      assert(not ok)
      return v .. "|" .. tostring(e)
    ]], name, leading, release)
    assert.is_true(leading:wait(1, X.GUARD))
    assert.equal(1, h:stats().inflight)
    h:close()
    h:close() -- twice is harmless
    assert.matches("closed", tostring(h))
    assert.has_error(function() h:stats() end, nil)
    h = nil -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    -- no handle is left anywhere: only the call in flight holds the group,
    -- and a state that opens the name now gets that group and joins the call
    local seen = T.cell(-1)
    local waiter = X.spawn([[
      local name, seen = ...
      local g = singleflight.group(name)
      seen:set(g:stats().inflight)
      local v, _, shared = g:call("hk", function() return "waiter ran" end)
      return v .. "|" .. tostring(shared) .. "|" .. g:stats().executions
    ]], name, seen)
    assert.is_true(seen:wait(0, X.GUARD))
    assert.equal(1, seen:get())
    local h2 = singleflight.group(name)
    X.wait_until(function() return h2:stats().shared >= 1 end, "waiter joined")
    h2:close()
    release:set(1)
    local got = X.join(leader)
    assert.matches("^value|.*closed group", got)
    assert.equal("value|true|1", X.join(waiter))
    -- every handle and call let go: the name now opens a fresh group
    collectgarbage()
    local fresh = singleflight.group(name)
    assert.equal(0, fresh:stats().calls)
    fresh:close()
  end)

  it("counts stats over every state", function()
    local N, K = 4, 25
    local name = X.name("stats")
    local done = T.barrier(N + 1)
    local checked = T.barrier(N + 1)
    local ts = {}
    for i = 1, N do
      ts[i] = X.spawn([[
        local name, id, K, done, checked = ...
        local g = singleflight.group(name)
        for k = 1, K do
          g:call(id .. ":" .. k, function() return k end)
        end
        pcall(g.call, g, "boom" .. id, function() error("x") end)
        g:forget("nothing")
        assert(done:wait(GUARD))
        local st = g:stats()
        assert(checked:wait(GUARD))
        return string.format("%d %d %d", st.calls, st.executions, st.panics)
      ]], name, i, K, done, checked)
    end
    local g = singleflight.group(name)
    assert.is_true(done:wait(X.GUARD))
    local st = g:stats()
    assert.is_true(checked:wait(X.GUARD))
    local want = string.format("%d %d %d", N * (K + 1), N * (K + 1), N)
    assert.equal(want, string.format("%d %d %d", st.calls, st.executions, st.panics))
    for _, got in ipairs(X.join_all(ts)) do
      assert.equal(want, got)
    end
  end)
end)
