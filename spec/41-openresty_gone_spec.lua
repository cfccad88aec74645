-- Leaders whose request ends inside fn, in a real nginx with one worker and
-- no timeout anywhere: ngx.exit, ngx.exec, ngx.redirect, a client that goes
-- away (lua_check_client_abort on), a light thread of g:start killed or
-- ended with its request, and a leading light thread killed by its own
-- request. Each time the duplicates must answer on their own (no garbage
-- collection forced, no timeout): the first takes over and runs its fn.
-- The server side is ngx_app.lua (gone_*, kill_then_call).
local ns = require "nginx_server"

-- Hang guard for an answer that should come within about a second (longer
-- under valgrind).
local GUARD = 5 * ns.patience
local times, tally = ns.times, ns.tally
local function eventually(pred, what, secs)
  return ns.eventually(pred, what, secs or GUARD)
end

local function stats(port, group)
  local a = ns.get(port, "/stats?group=" .. group, GUARD)
  assert.equal(200, a.status)
  local st = {}
  for k, v in pairs(a.fields) do
    st[k] = tonumber(v)
  end
  return st
end

local usable, why = ns.find()

if not usable then
  describe("OpenResty, leaders that go away", function()
    pending("a real nginx (" .. why .. ")")
  end)
  return
end

-- The duplicates all answered, with the value of the one that took over.
local function assert_taken_over(answers, n)
  assert.equal(n, #answers)
  local worst = 0
  for _, a in ipairs(answers) do
    assert.is_nil(a.timed_out, "a duplicate was still waiting after " .. GUARD .. " s")
    assert.equal(200, a.status)
    assert.equal("second", a.fields.value)
    assert.equal("true", a.fields.shared)
    worst = math.max(worst, tonumber(a.fields.after_ms) or -1)
  end
  assert.same({ ["true"] = 1, ["false"] = n - 1 }, tally(answers, "led"))
  return worst
end

describe("OpenResty, a leader whose request ends inside fn", function()
  local server, port

  setup(function()
    server = assert(ns.start(120))
    port = server.port
  end)

  teardown(function()
    if server then
      server.stop_reporting()
    end
  end)

  -- The leader of `key` ends its request (`how`) once n duplicates joined;
  -- returns the leader's answer (nil for a client that went away), the
  -- duplicates' answers, and the stats before.
  local function strand(how, key, n)
    local before = stats(port, "gone")
    local leader = ns.open(port, "/gone_leader?how=" .. how .. "&key=" .. key .. "&n=" .. n)
    eventually(function() return stats(port, "gone").inflight == before.inflight + 1 end,
               "the leader")
    local dups = {}
    for i = 1, n do
      dups[i] = ns.open(port, "/gone_dup?key=" .. key)
    end
    local lead
    if how == "abort" then
      eventually(function() return stats(port, "gone").shared == before.shared + n end,
                 "the duplicates")
      leader:close()
    else
      lead = ns.collect({ leader }, GUARD)[1]
    end
    local answers = ns.collect(dups, GUARD)
    assert_taken_over(answers, n)
    local st = stats(port, "gone")
    assert.equal(before.abandoned + 1, st.abandoned)
    -- the leader's fn, then the fn of the duplicate that took over
    assert.equal(before.executions + 2, st.executions)
    assert.equal(before.inflight, st.inflight)
    return lead, answers
  end

  it("ngx.exit(503) inside fn: the waiters take over; the leader's client gets 503", function()
    local lead = strand("exit", "exit", 3)
    assert.equal(503, lead.status)
  end)

  it("ngx.exec inside fn: the waiters take over; the leader's client gets the target", function()
    local lead = strand("exec", "exec", 3)
    assert.equal(200, lead.status)
    assert.equal("reached", lead.fields.exec_target)
  end)

  it("ngx.redirect inside fn: the waiters take over; the leader's client is redirected",
     function()
    local lead = strand("redirect", "redirect", 3)
    assert.equal(302, lead.status)
    assert.matches("/gone_elsewhere$", lead.headers.location)
  end)

  it("a client that went away (lua_check_client_abort on): the waiters take over", function()
    strand("abort", "abort", 3)
  end)

  it("g:start, its light thread killed inside fn: the waiters take over", function()
    local lead = strand("kill", "kill", 3)
    assert.equal(200, lead.status)
    assert.equal("true", lead.fields.killed)
    assert.equal("false", lead.fields.ready)
  end)

  it("g:start, the request exits while its light thread runs fn: the waiters take over",
     function()
    local lead = strand("start_exit", "start_exit", 3)
    assert.equal(204, lead.status)
  end)

  it("a leading light thread killed by its request, which then calls the key: it leads",
     function()
    local a = ns.get(port, "/kill_then_call?key=killed1&self=1", GUARD)
    assert.is_nil(a.timed_out, "the request that killed its leading thread hangs")
    assert.equal(200, a.status)
    assert.equal("true", a.fields.leading)
    assert.equal("true", a.fields.killed)
    assert.equal("self", a.fields.value)
    assert.equal("true", a.fields.led)
    assert.equal("1", a.fields.abandoned)
    assert.equal("0", a.fields.inflight)
    -- and the key is free for later callers
    local b = ns.get(port, "/gone_dup?key=killed1", GUARD)
    assert.equal("second", b.fields.value)
    assert.equal("true", b.fields.led)
    assert.equal(0, stats(port, "gone").inflight)
  end)

  it("a leading light thread killed: callers in other requests take over", function()
    local before = stats(port, "gone")
    local a = ns.get(port, "/kill_then_call?key=killed2", GUARD)
    assert.equal("true", a.fields.leading)
    assert.equal("true", a.fields.killed)
    local answers = ns.batch(port, times(3, "/gone_dup?key=killed2"), GUARD)
    assert_taken_over(answers, 3)
    local st = stats(port, "gone")
    assert.equal(before.abandoned + 1, st.abandoned)
    assert.equal(0, st.inflight)
    -- a later caller leads a call of its own
    local b = ns.get(port, "/gone_dup?key=killed2", GUARD)
    assert.equal("true", b.fields.led)
  end)

  -- regression: a cycle that collected the killed thread's coroutine
  -- before its callers waited left its guard to be finalized a cycle later
  -- (weak keys, LuaJIT), and the sweep, seeing no leader left, ran none
  it("a leading light thread killed and collected before anyone waits: callers take over",
     function()
    local before = stats(port, "gone")
    local a = ns.get(port, "/kill_then_call?key=killed3&collect=1", GUARD)
    assert.equal("true", a.fields.killed)
    local answers = ns.batch(port, times(3, "/gone_dup?key=killed3"), GUARD)
    assert_taken_over(answers, 3)
    local st = stats(port, "gone")
    assert.equal(before.abandoned + 1, st.abandoned)
    assert.equal(0, st.inflight)
  end)

  it("the library ran no garbage collection to find any of them", function()
    local a = ns.get(port, "/library_collections", GUARD)
    assert.equal(200, a.status)
    assert.equal("0", a.fields.n)
  end)

  if os.getenv("SINGLEFLIGHT_NGINX_VALGRIND") == "1" then
    it("valgrind saw no invalid read or write in nginx", function()
      local errors = server.valgrind_errors()
      assert.same({}, errors)
    end)
  else
    -- regression: the sweep asked OpenResty's coroutine.status about
    -- coroutines of ended requests, which reads their freed bookkeeping
    pending("valgrind saw no invalid read or write in nginx (run with "
            .. "SINGLEFLIGHT_NGINX_VALGRIND=1: nginx under valgrind)")
  end
end)

describe("OpenResty, a fresh worker where only futures wait", function()
  -- regression: a future's wait did not start the sweep
  it("futures joined to a leader whose request exits answer, and one takes over",
     function()
    local server = assert(ns.start(30))
    local port = server.port
    local ok, err = pcall(function()
      local leader = ns.open(port, "/gone_leader?how=exit&key=futures&n=3")
      eventually(function() return stats(port, "gone").inflight == 1 end, "the leader")
      local dups = {}
      for i = 1, 3 do
        dups[i] = ns.open(port, "/gone_future?key=futures")
      end
      assert.equal(503, ns.collect({ leader }, GUARD)[1].status)
      assert_taken_over(ns.collect(dups, GUARD), 3)
      assert.equal(1, stats(port, "gone").abandoned)
    end)
    server.stop()
    assert(ok, err)
  end)
end)
