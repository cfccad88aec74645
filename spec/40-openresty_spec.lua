-- The ngx backend in a real nginx: Debian's nginx with the Lua module and
-- lua-resty-core, started for this file on 127.0.0.1 (nginx_server.lua)
-- and driven over HTTP. The server side is ngx_app.lua.
local ns = require "nginx_server"
local times, tally = ns.times, ns.tally
local function eventually(pred, what, secs)
  return ns.eventually(pred, what, secs or 5)
end

local function stats(port, group)
  local a = ns.get(port, "/stats?group=" .. (group or "stampede"))
  assert.equal(200, a.status)
  local st = {}
  for k, v in pairs(a.fields) do
    st[k] = tonumber(v)
  end
  return st
end

-- Steps until pred() holds, for `secs` seconds at most.

local usable, why = ns.find()

if not usable then
  describe("OpenResty", function()
    pending("a real nginx (" .. why .. ")")
  end)
  return
end

describe("OpenResty", function()
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

  it("200 concurrent requests on one key run fn once and share the value", function()
    local answers = ns.batch(port, times(200, "/stampede?n=200"), 20)
    assert.equal(200, #answers)
    for _, a in ipairs(answers) do
      assert.equal(200, a.status)
    end
    assert.same({ ["fresh 1"] = 200 }, tally(answers, "value"))
    assert.same({ ["second"] = 200 }, tally(answers, "err"))
    assert.same({ ["true"] = 1, ["false"] = 199 }, tally(answers, "led"))
    -- the leader too: its result went to 199 others
    assert.same({ ["true"] = 200 }, tally(answers, "shared"))
    local st = stats(port)
    assert.equal(200, st.calls)
    assert.equal(1, st.executions)
    assert.equal(199, st.shared)
    assert.equal(0, st.inflight)
    assert.equal(0, st.panics)
  end)

  it("wakes the waiters at once: each waits once and answers within ms", function()
    -- the stampede above: 199 waits, one each, none coming back to poll
    assert.equal(199, stats(port).waits)
    ns.get(port, "/reset_waits")
    local answers = ns.batch(port, times(30, "/stampede?n=30"), 20)
    assert.same({ ["true"] = 1, ["false"] = 29 }, tally(answers, "led"))
    local worst = 0
    for _, a in ipairs(answers) do
      assert.equal(200, a.status)
      local gap = tonumber(a.fields.gap_ms)
      assert.is_number(gap)
      worst = math.max(worst, gap)
    end
    -- from the leader's return to each waiter's, in one event loop. The
    -- proof of no polling is the count of waits above and below; this bound
    -- is only a generous guard against a waiter that sleeps its way back.
    assert.is_true(worst < 500, "slowest waiter answered " .. worst .. " ms late")
    assert.equal(29, stats(port).waits)
  end)

  it("a table raised by the leader reaches every request as a panic", function()
    local answers = ns.batch(port, times(20, "/panic?n=20"), 20)
    for _, a in ipairs(answers) do
      assert.equal(200, a.status)
      assert.equal("false", a.fields.ok)
      assert.equal("true", a.fields.is_panic)
      assert.equal("42", a.fields.code)
      assert.equal("panic", a.fields.key)
      assert.equal("singleflight: ", a.fields.text)
    end
    -- the very same table in every request
    local ids = tally(answers, "value_id")
    local n, count = 0, 0
    for id, c in pairs(ids) do
      n, count = n + 1, c
      assert.matches("^table: ", id)
    end
    assert.equal(1, n)
    assert.equal(20, count)
    local st = stats(port, "panic")
    assert.equal(1, st.executions)
    assert.equal(1, st.panics)
    assert.equal(0, st.inflight)
  end)

  it("waiters past timeout get TIMEOUT, or run fn with on_timeout = \"run\"", function()
    local leader = ns.open(port, "/slow_leader?timeouts=6")
    eventually(function() return stats(port, "slow").inflight == 1 end, "the leader")
    local paths = {}
    for i = 1, 6 do
      paths[i] = i <= 3 and "/slow_dup?mode=error" or "/slow_dup?mode=run"
    end
    local answers = ns.batch(port, paths, 10)
    for i, a in ipairs(answers) do
      assert.equal(200, a.status)
      assert.equal("false", a.fields.shared)
      if i <= 3 then
        assert.is_nil(a.fields.value)
        assert.equal("singleflight: wait timed out", a.fields.err)
      else
        assert.equal("own", a.fields.value)
        assert.is_nil(a.fields.err)
      end
    end
    local lead = ns.collect({ leader }, 10)[1]
    assert.equal(200, lead.status)
    assert.equal("leader", lead.fields.value)
    local st = stats(port, "slow")
    assert.equal(6, st.timeouts)
    assert.equal(1 + 3, st.executions)
    assert.equal(0, st.inflight)
  end)

  it("a leader whose client went away does not hang the others", function()
    local leader = ns.open(port, "/abort_leader")
    eventually(function() return stats(port, "abort").inflight == 1 end, "the leader")
    local dups = {}
    for i = 1, 5 do
      dups[i] = ns.open(port, "/abort_dup")
    end
    eventually(function() return stats(port, "abort").shared == 5 end, "the duplicates")
    -- the client gives up: nginx ends the request (lua_check_client_abort)
    -- and drops the leader's coroutine, suspended inside fn
    leader:close()
    -- the dropped coroutine is found at the next garbage collection
    eventually(function()
      ns.get(port, "/gc")
      return stats(port, "abort").abandoned == 1
    end, "the abandoned leader")
    local answers = ns.collect(dups, 10)
    for _, a in ipairs(answers) do
      assert.equal(200, a.status)
      assert.equal("second", a.fields.value)
      assert.equal("true", a.fields.shared)
    end
    assert.same({ ["true"] = 1, ["false"] = 4 }, tally(answers, "led"))
    local st = stats(port, "abort")
    assert.equal(1, st.abandoned)
    assert.equal(2, st.executions)
    assert.equal(0, st.inflight)
  end)

  it("after an aborted leader, the next request on its key leads (no 'recursive call')",
     function()
    -- ngx_lua gives the aborted request's coroutine to the next request
    local leader = ns.open(port, "/abort_leader")
    eventually(function() return stats(port, "abort").inflight == 1 end, "the leader")
    local before = stats(port, "abort")
    leader:close()
    eventually(function() return stats(port, "abort").finished == before.finished + 1 end,
               "nginx to end the aborted request")
    local a = ns.get(port, "/abort_dup", 10)
    assert.equal(200, a.status)
    assert.equal("second", a.fields.value)
    local st = stats(port, "abort")
    assert.equal(before.abandoned + 1, st.abandoned)
    assert.equal(0, st.inflight)
  end)

  it("a duplicate in a phase that can't yield gets a clear error", function()
    local leader = ns.open(port, "/phase_leader")
    eventually(function() return stats(port, "phase").inflight == 1 end, "the leader")
    local a = ns.get(port, "/phase_probe")
    assert.equal(200, a.status)
    assert.equal("false", a.headers["x-ok"])
    assert.matches('singleflight: cannot wait for key "phase": the nginx phase '
                   .. "'header_filter' cannot yield", a.headers["x-err"], 1, true)
    local lead = ns.collect({ leader }, 10)[1]
    assert.equal("leader", lead.fields.value)
    local st = stats(port, "phase")
    assert.equal(1, st.executions)
    assert.equal(0, st.shared)
  end)

  it("start: a future in a request, and one started from the log phase", function()
    local a = ns.get(port, "/start")
    assert.equal("bar!", a.fields.value)
    assert.is_nil(a.fields.err)
    assert.equal("false", a.fields.shared)
    assert.equal("true", a.fields.ready)
    -- log_by_lua can't spawn light threads: the leader runs in a timer
    assert.equal(200, ns.get(port, "/start_from_log").status)
    local b = ns.get(port, "/start_check")
    assert.equal("via timer in phase timer", b.fields.value)
  end)

  -- regression: a duplicate in a worker thread armed the sweep's timer,
  -- which the thread's Lua state does not have
  it("duplicates in ngx.run_worker_thread block in the core and share the result",
     function()
    local a = ns.get(port, "/worker_threads?key=wt1&n=4", 10 * ns.patience)
    assert.is_nil(a.timed_out)
    assert.equal(200, a.status)
    assert.equal("leader/true", a.fields.leader)
    for i = 1, 4 do
      assert.equal("leader/true", a.fields["dup" .. i])
    end
  end)

  it("nginx logged no Lua errors but the report of the raising fn", function()
    local log = server.log()
    -- the leader of /panic reports its fn's error, once for its one execution
    local report = '[^\n]*%[error%][^\n]*singleflight: fn raised for key "panic": [^\n]*'
    local rest, reports = log:gsub(report, "")
    assert.equal(1, reports)
    assert.is_nil(rest:match("[^\n]*%[error%][^\n]*"))
    assert.is_true(server.alive())
  end)
end)
