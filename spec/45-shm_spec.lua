-- Groups over a lua_shared_dict (the shm option) in a real nginx with four
-- workers: one execution per key across the workers. The server side is
-- ngx_shm_app.lua; shm_server.lua starts it.
local shm = require "shm_server"
local ns = shm.ns
local socket = require "socket"
local times, tally, distinct = shm.times, shm.tally, shm.distinct

describe("the shm option outside OpenResty", function()
  it("is an error at new and group naming the option", function()
    if rawget(_G, "ngx") then
      return
    end
    local singleflight = require "singleflight"
    local ok, e = pcall(singleflight.new, { shm = "sf" })
    assert.is_false(ok)
    assert.matches("bad option 'shm' to 'new'", e, 1, true)
    assert.matches("OpenResty", e, 1, true)
    ok, e = pcall(singleflight.group, "g", { shm = "sf" })
    assert.is_false(ok)
    assert.matches("bad option 'shm' to 'group'", e, 1, true)
  end)
end)

local usable, why = shm.find()
if not usable then
  describe("shm across nginx workers", function()
    pending("a real nginx (" .. why .. ")")
  end)
  return
end

describe("shm across four nginx workers", function()
  local server, port

  setup(function()
    server, port = shm.start(4)
  end)

  teardown(function()
    shm.stop_reporting(server)
  end)

  it("runs four workers", function()
    shm.eventually(function() return #server.workers() == 4 end, "four workers")
  end)

  it("a group with shm is a singleflight.Group whose methods are the tier's; "
     .. "other groups keep theirs", function()
    local f = ns.get(port, "/shm/kinds").fields
    assert.equal("singleflight.Group,singleflight.Group", f.names)
    assert.equal("true", f.tostring)
    for _, same in ipairs { "same_call", "same_forget", "same_stats" } do
      assert.equal("false", f[same], same)
    end
    assert.equal("true", f.plain_forget_core)
    assert.equal("true", f.plain_call)
    -- the tier checks its arguments as call does, with the same words
    assert.matches("bad argument #2 to 'call' %(function or callable value expected", f.bad)
    assert.equal(f.plain_bad, f.bad)
    assert.matches("bad argument #1 to 'call' %(key is NaN%)", f.nan)
    assert.equal(f.plain_nan, f.nan)
    -- a closed one says so, naming the method
    assert.matches("singleflight: attempt to use a closed group %(in 'call'%)", f.closed)
    assert.matches("singleflight: attempt to use a closed group %(in 'stats'%)", f.closed_stats)
    assert.matches("singleflight: attempt to use a closed group %(in 'forget'%)", f.closed_forget)
    -- the tier's call on a group of another kind says so
    assert.matches("bad argument #1 to 'call' %(a group with the shm option expected%)",
                   f.crossed)
  end)

  it("200 concurrent requests over the workers run fn once and share its value", function()
    local before = shm.counters(port, "stampede")
    local answers = ns.batch(port, times(200, "/shm/stampede?key=s1&n=200"), 30)
    for _, a in ipairs(answers) do
      assert.equal(200, a.status)
    end
    local pids = distinct(answers, "pid")
    assert.is_true(#pids >= 2, "the connections reached one worker only")
    assert.same({ ["1"] = 200 }, tally(answers, "exec"))
    assert.equal(1, #distinct(answers, "leader"))
    assert.same({ second = 200 }, tally(answers, "err"))
    -- the leader too: others joined
    assert.same({ ["true"] = 200 }, tally(answers, "shared"))
    -- the table crossed whole: a cycle, a shared subtable, numbers, strings
    assert.same({ ["true"] = 200 }, tally(answers, "cycle"))
    assert.same({ ["true"] = 200 }, tally(answers, "shared_list"))
    assert.same({ ["1,2.5,three"] = 200 }, tally(answers, "list"))
    -- every waiter, in every worker, is back within a few milliseconds of the
    -- leader's end (a generous guard here; make bench measures it)
    local worst = 0
    for _, a in ipairs(answers) do
      worst = math.max(worst, tonumber(a.fields.gap_ms))
    end
    assert.is_true(worst < 500, "a waiter came back " .. worst .. " ms after the leader")
    -- g:stats() counts for the whole instance, in every worker alike
    local everywhere = shm.counters_everywhere(port, "stampede", #pids)
    assert.equal(#pids, #everywhere)
    for _, after in ipairs(everywhere) do
      local st = shm.delta(after, before)
      assert.equal(200, st.calls)
      assert.equal(1, st.executions)
      assert.equal(1, st.leads)
      assert.equal(#pids - 1, st.waits) -- one watcher per other worker
      assert.equal(199, st.shared)
      assert.equal(0, st.panics)
      assert.equal(0, st.fallbacks)
      assert.equal(0, st.takeovers)
      assert.equal(0, after.inflight)
    end
    -- nothing of it is left in the dict: locks, watchers' counts, results
    assert.equal(0, shm.entries(port, "l"))
    assert.equal(0, shm.entries(port, "w"))
    assert.equal(0, shm.entries(port, "r"))
  end)

  it("with one group per worker, the same stampede runs fn once per worker", function()
    local answers = ns.batch(port, times(200, "/shm/stampede?group=local_only&key=s2&n=200"), 30)
    local pids = distinct(answers, "pid")
    assert.equal(#pids, #distinct(answers, "leader"))
    assert.equal(#pids, shm.stats(port, "local_only").executions)
  end)

  it("a table raised by the leader reaches every worker as a panic", function()
    local before = shm.counters(port, "panic")
    local answers = ns.batch(port, times(40, "/shm/panic?key=p1&n=40"), 30)
    local leader = shm.book(port, "leader:panicp1")
    for _, a in ipairs(answers) do
      assert.equal(200, a.status)
      assert.equal("false", a.fields.ok)
      assert.equal("true", a.fields.is_panic)
      assert.equal("false", a.fields.wrapped) -- a panic, not a panic of a panic
      assert.equal("p1", a.fields.key)
      assert.equal("table", a.fields.value_type)
      assert.equal("42", a.fields.code)
      assert.equal("true", a.fields.deep)
      assert.equal("singleflight: ", a.fields.message)
      -- the leader's traceback, from where fn raised
      assert.equal("true", a.fields.raised_in_app)
    end
    -- in the leader's worker, one and the same table; in the others, a copy
    local ids = {}
    for _, a in ipairs(answers) do
      ids[a.fields.pid] = ids[a.fields.pid] or {}
      ids[a.fields.pid][a.fields.value_id] = true
    end
    for _, set in pairs(ids) do
      local n = 0
      for _ in pairs(set) do
        n = n + 1
      end
      assert.equal(1, n)
    end
    assert.equal("1", shm.book(port, "exec:panicp1"))
    assert.is_truthy(leader)
    local st = shm.delta(shm.counters(port, "panic"), before)
    assert.equal(1, st.executions)
    assert.equal(1, st.panics)
    assert.equal(40, st.calls)
  end)

  it("a raised value that cannot cross reaches the other workers as its text", function()
    local answers = ns.batch(port, times(40, "/shm/panic?key=p2&n=40&kind=fn"), 30)
    local leader = shm.book(port, "leader:panicp2")
    local here, there = 0, 0
    for _, a in ipairs(answers) do
      assert.equal("true", a.fields.is_panic)
      assert.equal("p2", a.fields.key)
      if a.fields.pid == leader then
        here = here + 1
        assert.equal("function", a.fields.value_type)
      else
        there = there + 1
        assert.equal("string", a.fields.value_type)
        assert.equal("function", a.fields.text)
      end
    end
    assert.is_true(here > 0 and there > 0)
    assert.equal("1", shm.book(port, "exec:panicp2"))
  end)

  it("a result that cannot cross is an error in the other workers only", function()
    local answers = ns.batch(port, times(40, "/shm/cross?key=c1&n=40"), 30)
    local leader = shm.book(port, "leader:crossc1")
    local here, there = 0, 0
    for _, a in ipairs(answers) do
      assert.equal(200, a.status)
      if a.fields.pid == leader then
        here = here + 1
        assert.equal("true", a.fields.ok)
        assert.equal("function", a.fields.type)
        assert.equal("fine", a.fields.err)
      else
        there = there + 1
        assert.equal("false", a.fields.ok)
        assert.equal("false", a.fields.is_panic)
        assert.equal('singleflight: result for key "c1" cannot cross nginx workers (function)',
                     a.fields.message)
      end
    end
    assert.is_true(here > 0 and there > 0)
    assert.equal("1", shm.book(port, "exec:crossc1"))
  end)

  it("a killed leader's worker is replaced by a caller in another worker within a second",
     function()
    local answers, victim, after = shm.kill_leader(port, 40, "k1")
    local alive = {}
    for _, a in ipairs(answers) do
      if a.status == 200 then
        alive[#alive + 1] = a
        assert.not_equal(tostring(victim), a.fields.pid)
      else
        assert.equal(0, a.status) -- the connection died with its worker
      end
    end
    assert.is_true(#alive > 0, "no request reached a worker that lives")
    -- the second execution, in a worker that lives, for every request left
    local values = distinct(alive, "value")
    assert.equal(1, #values)
    assert.matches("^exec 2 by %d+$", values[1])
    assert.not_equal(tostring(victim), values[1]:match("%d+$"))
    assert.equal("2", shm.book(port, "exec:killk1"))
    -- a lease of 0.9 s; a generous guard against one that never runs out
    assert.is_number(after)
    assert.is_true(after < 3, "took over after " .. tostring(after) .. " s")
    ns.get(port, "/shm/set?key=release:kill")
  end)

  it("a slow leader that lives is never replaced", function()
    local answers = ns.batch(port, times(30, "/shm/slow?key=w1&n=30&hold=2.2"), 30)
    assert.same({ ["1"] = 30 }, tally(answers, "exec"))
    assert.equal(1, #distinct(answers, "leader"))
    assert.equal("1", shm.book(port, "exec:sloww1"))
  end)

  it("a reload does not run a slow leader twice: its old worker keeps its lease", function()
    local before = server.workers()
    local first = {}
    for i = 1, 10 do
      first[i] = ns.open(port, "/shm/slow?key=r1&n=10&hold=2")
    end
    shm.eventually(function()
      return tonumber(shm.book(port, "arrived:slowr1")) == 10
    end, "the first requests")
    assert.is_true(server.signal("HUP"))
    -- new workers, the old ones finishing their requests
    shm.eventually(function()
      local old = {}
      for _, pid in ipairs(before) do
        old[pid] = true
      end
      local new = 0
      for _, pid in ipairs(server.workers()) do
        new = new + (old[pid] and 0 or 1)
      end
      return new == 4
    end, "the new workers", 10)
    local second = ns.batch(port, times(10, "/shm/slow?key=r1&n=10&hold=2"), 30)
    local answers = ns.collect(first, 30)
    assert.same({ ["1"] = 10 }, tally(answers, "exec"))
    assert.same({ ["1"] = 10 }, tally(second, "exec"))
    assert.equal("1", shm.book(port, "exec:slowr1"))
  end)

  it("max_age: a leader too old is taken over; its result goes to its own caller", function()
    local first = ns.open(port, "/shm/aged?key=a1")
    shm.eventually(function()
      return shm.book(port, "started:ageda1:1") ~= nil
    end, "the first execution")
    local answers = ns.batch(port, times(20, "/shm/aged?key=a1"), 30)
    local mine = ns.collect({ first }, 10)[1]
    assert.equal("exec 1", mine.fields.value)
    assert.same({ ["exec 2"] = 20 }, tally(answers, "value"))
    assert.same({ ["true"] = 20 }, tally(answers, "shared"))
    local s1 = tonumber(shm.book(port, "started:ageda1:1"))
    local s2 = tonumber(shm.book(port, "started:ageda1:2"))
    -- max_age is 0.3 s (a generous guard above it)
    assert.is_true(s2 - s1 >= 0.29 and s2 - s1 < 1.2, "taken over after " .. (s2 - s1))
    assert.equal("2", shm.book(port, "exec:ageda1"))
  end)

  -- regression: with fn longer than max_age, each take-over's result went
  -- to its own caller only: a new execution every max_age, and waiters
  -- answered later and later for as long as callers came
  it("max_age shorter than fn: the first execution to finish answers every caller waiting",
     function()
    local conns = {}
    for i = 1, 16 do -- a caller every 0.1 s for 1.6 s; fn takes 1 s
      conns[i] = ns.open(port, "/shm/aged?key=a2&all=1&hold=1")
      socket.sleep(0.1)
    end
    local answers = ns.collect(conns, 30)
    local first = 0
    for i, a in ipairs(answers) do
      assert.is_nil(a.timed_out, "caller " .. i)
      assert.equal(200, a.status)
      -- max_age is 0.3 s, fn 1 s: a caller that leads nothing waits about
      -- one fn at most (it waited until callers stopped coming, and one fn
      -- more: 2.5 s here)
      if a.fields.led == "false" then
        assert.is_true(tonumber(a.fields.took) < 1.8,
                       ("caller %d waited %s s"):format(i, a.fields.took))
      end
      if a.fields.value == "exec 1" and a.fields.led == "false" then
        first = first + 1
      end
    end
    -- callers in other workers than the one leading the execution that
    -- took over get the first result (before, it went to its leader only;
    -- how many depends on which workers the callers landed on)
    assert.is_true(first >= 1, first .. " callers answered by the first execution")
    local execs = tonumber(shm.book(port, "exec:ageda2"))
    assert.is_true(execs <= 8, execs .. " executions")
  end)

  it("forget reaches every worker; waiters of the forgotten call still get its result",
     function()
    local first = {}
    for i = 1, 20 do
      first[i] = ns.open(port, "/shm/forget?key=f1")
    end
    shm.eventually(function()
      return tonumber(shm.book(port, "arrived:forgetf1")) == 20
    end, "the first wave")
    assert.equal("true", ns.get(port, "/shm/do_forget?key=f1").fields.forgot)
    local second = ns.batch(port, times(20, "/shm/forget?key=f1&n=40"), 30)
    assert.same({ ["exec 2"] = 20 }, tally(second, "value"))
    assert.is_true(#distinct(second, "pid") >= 2)
    ns.get(port, "/shm/set?key=release:forget")
    local answers = ns.collect(first, 30)
    assert.same({ ["exec 1"] = 20 }, tally(answers, "value"))
    assert.equal("2", shm.book(port, "exec:forgetf1"))
    -- nothing in flight any more
    assert.equal("false", ns.get(port, "/shm/do_forget?key=f1").fields.forgot)
  end)

  it("timeout applies to waiters in every worker; on_timeout = 'run' runs fn there", function()
    local before = shm.counters(port, "short")
    local first = ns.open(port, "/shm/short?key=t1")
    shm.eventually(function()
      return shm.book(port, "exec:shortt1") ~= nil
    end, "the first execution")
    local answers = ns.batch(port, times(20, "/shm/short?key=t1"), 30)
    for _, a in ipairs(answers) do
      assert.equal("singleflight: wait timed out", a.fields.err)
      assert.equal("false", a.fields.shared)
      local ms = tonumber(a.fields.waited_ms)
      assert.is_true(ms >= 150 and ms < 950, "waited " .. ms .. " ms")
    end
    assert.matches("^exec 1 by", ns.collect({ first }, 10)[1].fields.value)
    assert.equal(20, shm.delta(shm.counters(port, "short"), before).timeouts)

    first = ns.open(port, "/shm/short?key=t2&run=1")
    shm.eventually(function()
      return shm.book(port, "exec:short_runt2") ~= nil
    end, "the first execution")
    answers = ns.batch(port, times(20, "/shm/short?key=t2&run=1"), 30)
    for _, a in ipairs(answers) do
      assert.matches("^exec %d+ by %d+$", a.fields.value)
      assert.not_equal("exec 1", a.fields.value:match("^exec %d+"))
    end
    assert.matches("^exec 1 by", ns.collect({ first }, 10)[1].fields.value)
  end)

  it("timeout = 0: a caller that finds the key free leads for the instance", function()
    for _, mode in ipairs { "", "&run=1" } do
      local key = mode == "" and "z1" or "z2"
      local name = mode == "" and "zero" or "zero_run"
      local first = ns.open(port, "/shm/short?zero=1&key=" .. key .. mode)
      shm.eventually(function()
        return shm.book(port, "exec:" .. name .. key) ~= nil
      end, "the first execution")
      local answers = ns.batch(port, times(10, "/shm/short?zero=1&key=" .. key .. mode), 30)
      for _, a in ipairs(answers) do
        assert.is_true(tonumber(a.fields.waited_ms) < 500)
        if mode == "" then -- none waits
          assert.equal("singleflight: wait timed out", a.fields.err)
        else -- each runs fn itself
          assert.not_equal("exec 1", a.fields.value:match("^exec %d+"))
        end
      end
      assert.matches("^exec 1 by", ns.collect({ first }, 10)[1].fields.value)
    end
  end)

  it("g:start and f:wait work across workers", function()
    local before = shm.counters(port, "start")
    local answers = ns.batch(port, times(40, "/shm/start?key=st1&n=40"), 30)
    assert.same({ ["1"] = 40 }, tally(answers, "exec"))
    assert.same({ ["true"] = 40 }, tally(answers, "ready"))
    assert.same({ ["true"] = 40 }, tally(answers, "tostring"))
    assert.equal(1, shm.delta(shm.counters(port, "start"), before).executions)
  end)

  it("a named group over the dict", function()
    local answers = ns.batch(port, times(40, "/shm/named?key=n1&n=40"), 30)
    assert.same({ ["1"] = 40 }, tally(answers, "exec"))
    -- its counters are its own (the groups made with new count apart)
    local st = shm.counters(port, "named")
    assert.equal(1, st.executions)
    assert.equal(40, st.calls)
  end)

  it("a phase that cannot wait gets an error naming the key and the phase", function()
    local conns = {}
    for i = 1, 8 do
      conns[i] = ns.open(port, "/shm/slow?key=lp1&n=8&hold=1")
    end
    shm.eventually(function()
      return tonumber(shm.book(port, "arrived:slowlp1")) == 8
    end, "the callers")
    -- from every worker, several times: each finds the key in flight
    for _ = 1, 8 do
      assert.equal(200, ns.get(port, "/log_phase?key=lp1").status)
    end
    local e = shm.book(port, "log_phase:lp1")
    assert.matches('singleflight: cannot wait for key "lp1"', e, 1, true)
    assert.matches("'log' cannot yield", e, 1, true)
    assert.same({ ["1"] = 8 }, tally(ns.collect(conns, 10), "exec"))
  end)

  it("a bad shm option is an error at new naming it", function()
    local a = ns.get(port, "/shm/bad_options")
    assert.matches([[bad option 'shm' to 'new' (no lua_shared_dict named "nope")]],
                   a.fields.missing, 1, true)
    assert.matches([[bad option 'shm' to 'new' (string expected, got number)]],
                   a.fields.number, 1, true)
  end)

  it("a full dict: each worker runs fn for its own callers, counted and logged once", function()
    ns.get(port, "/shm/fill")
    local answers = ns.batch(port, times(40, "/shm/tiny?key=x1&n=40"), 30)
    for _, a in ipairs(answers) do
      assert.equal(200, a.status)
      assert.equal("true", a.fields.ok)
      assert.equal(a.fields.pid, a.fields.leader) -- its own worker's execution
    end
    local pids = distinct(answers, "pid")
    -- counted for the instance all the same: the counters were made at new
    local st = shm.counters(port, "tiny")
    assert.equal(#pids, st.executions)
    assert.equal(40, st.calls)
    assert.is_true(st.fallbacks >= #pids)
    local function logged()
      local n = 0
      for _ in server.log():gmatch("calls fall back to deduplication in each worker") do
        n = n + 1
      end
      return n
    end
    local lines = logged()
    assert.is_true(lines >= 1 and lines <= 4, lines .. " log lines")
    ns.batch(port, times(40, "/shm/tiny?key=x2&n=40"), 30)
    assert.equal(lines, logged()) -- at most once a minute
  end)
end)
