-- g:start twice in a row on one key, under a plain scheduler whose spawn
-- runs the new thread later: the first start leads from the moment it
-- returns and the second joins it, as Go's DoChan, whatever order the
-- scheduler runs its new threads in (cqueues' wrap runs them newest
-- first). The same cases run under cqueues and copas in scheduler_suite.
describe("g:start twice in a row on one key", function()
  local singleflight = require "singleflight"
  local helpers = require "helpers"
  local pack, unpack = helpers.pack, helpers.unpack

  -- A round-robin scheduler of plain coroutines. spawn queues the new
  -- thread for the next turn: after the others ("fifo") or before them,
  -- the newest first ("lifo").
  local function scheduler(order)
    local s = { ready = {}, errs = {}, spawned = 0 }
    function s.spawn(f, ...)
      local args = pack(...)
      local co = coroutine.create(function() return f(unpack(args, 1, args.n)) end)
      s.spawned = s.spawned + 1
      if order == "lifo" then
        table.insert(s.ready, 1, co)
      else
        s.ready[#s.ready + 1] = co
      end
    end
    function s.step()
      local turn = s.ready
      s.ready = {}
      for _, co in ipairs(turn) do
        local ok, e = coroutine.resume(co)
        if not ok then
          s.errs[#s.errs + 1] = e
        elseif coroutine.status(co) == "suspended" then
          s.ready[#s.ready + 1] = co
        end
      end
    end
    function s.run_until(pred, what)
      for _ = 1, 1000 do
        if pred() then
          return
        end
        s.step()
      end
      error("gave up waiting for " .. what .. (s.errs[1] and (": " .. tostring(s.errs[1])) or ""))
    end
    s.backend = {
      name = "plain " .. order,
      wait = function() coroutine.yield() end,
      wake = function() end,
      can_wait = function()
        local co, main = coroutine.running()
        return co ~= nil and not main, "not in a coroutine"
      end,
      spawn = s.spawn,
    }
    return s
  end

  for _, order in ipairs { "fifo", "lifo" } do
    for _, yields in ipairs { true, false } do
      local how = yields and "yields" or "does not yield"
      it("the second joins the first, whose fn " .. how .. " (spawn " .. order .. ")", function()
        local s = scheduler(order)
        local g = singleflight.new { backend = s.backend }
        local ran, gate = {}, helpers.gate()
        local function fn(tag)
          ran[#ran + 1] = tag
          if yields then
            gate.wait()
          end
          return { tag }, "err " .. tag
        end
        local f1, f2, out1, out2
        s.spawn(function()
          f1 = g:start("twice", fn, "first")
          f2 = g:start("twice", fn, "second")
          assert.same({}, ran) -- fn runs in a thread of its own, later
          out1 = pack(f1:wait())
          out2 = pack(f2:wait())
        end)
        s.step()
        assert.is_not_nil(f2)
        assert.equal(1 + 1, s.spawned) -- the starter, and one leader
        local st = g:stats()
        assert.equal(1, st.inflight)
        assert.equal(2, st.calls)
        assert.equal(1, st.shared)
        if yields then
          s.run_until(function() return #ran == 1 end, "fn")
          for _ = 1, 5 do
            s.step()
          end
          assert.is_nil(out1)
          assert.is_false(f1:ready())
          assert.is_false(f2:ready())
          gate.open()
        end
        s.run_until(function() return out2 ~= nil end, "the futures")
        assert.same({}, s.errs)
        assert.same({ "first" }, ran)
        assert.same({ "first" }, out1[1])
        assert.equal(out1[1], out2[1]) -- the very same table
        assert.same({ n = 3, out1[1], "err first", true }, out1)
        assert.same({ n = 3, out1[1], "err first", true }, out2)
        st = g:stats()
        assert.equal(0, st.inflight)
        assert.equal(2, st.calls)
        assert.equal(1, st.executions)
        assert.equal(1, st.shared)
        -- the key is free: a later start leads a new call
        local f3
        s.spawn(function() f3 = g:start("twice", fn, "third") end)
        s.run_until(function() return f3 ~= nil and f3:ready() end, "a later future")
        assert.same({ "first", "third" }, ran)
        assert.same({ n = 3, { "third" }, "err third", false }, pack(f3:wait()))
      end)
    end
  end

  it("a call right after start joins the started call", function()
    local s = scheduler("lifo")
    local g = singleflight.new { backend = s.backend }
    local ran = {}
    local function fn(tag)
      ran[#ran + 1] = tag
      return { tag }
    end
    local f, got
    s.spawn(function()
      f = g:start("k", fn, "started")
      got = pack(g:call("k", fn, "called"))
    end)
    s.run_until(function() return got ~= nil end, "the call")
    assert.same({}, s.errs)
    assert.same({ "started" }, ran)
    assert.same({ "started" }, got[1])
    assert.is_true(got[3])
    assert.same({ n = 3, got[1], nil, true }, pack(f:wait()))
    local st = g:stats()
    assert.equal(2, st.calls)
    assert.equal(1, st.executions)
    assert.equal(1, st.shared)
    assert.equal(0, st.inflight)
  end)
end)
