-- Groups over a lua_shared_dict in a real nginx with two workers: a
-- stampede, a leader whose worker is killed, and one whose request goes
-- away while its worker lives. The server side is ngx_shm_app.lua.
local shm = require "shm_server"
local ns = shm.ns
local socket = require "socket"
local times, tally, distinct = shm.times, shm.tally, shm.distinct

local usable, why = shm.find()
if not usable then
  describe("shm across two nginx workers", function()
    pending("a real nginx (" .. why .. ")")
  end)
  return
end

describe("shm across two nginx workers", function()
  local server, port

  setup(function()
    server, port = shm.start(2)
  end)

  teardown(function()
    shm.stop_reporting(server)
  end)

  it("100 concurrent requests over both workers run fn once", function()
    shm.eventually(function() return #server.workers() == 2 end, "two workers")
    local before = shm.counters(port, "stampede")
    local answers = ns.batch(port, times(100, "/shm/stampede?key=s1&n=100"), 30)
    assert.same({ ["1"] = 100 }, tally(answers, "exec"))
    assert.same({ ["true"] = 100 }, tally(answers, "shared"))
    local pids = distinct(answers, "pid")
    assert.equal(2, #pids, "the connections reached one worker only")
    local st = shm.delta(shm.counters(port, "stampede"), before)
    assert.equal(100, st.calls)
    assert.equal(1, st.executions)
    assert.equal(1, st.leads)
    assert.equal(1, st.waits)
    assert.equal(99, st.shared)
  end)

  it("the other worker takes over from a killed leader's", function()
    local answers, victim, after = shm.kill_leader(port, 30, "k1")
    local alive = {}
    for _, a in ipairs(answers) do
      if a.status == 200 then
        alive[#alive + 1] = a
      end
    end
    assert.is_true(#alive > 0, "no request reached the worker that lives")
    local values = distinct(alive, "value")
    assert.equal(1, #values)
    assert.matches("^exec 2 by %d+$", values[1])
    assert.not_equal(tostring(victim), values[1]:match("%d+$"))
    assert.is_true(after < 3, "took over after " .. tostring(after) .. " s")
    assert.equal("2", shm.book(port, "exec:killk1"))
    ns.get(port, "/shm/set?key=release:kill")
    -- the master started a new worker in its place
    shm.eventually(function() return #server.workers() == 2 end, "a new worker")
  end)

  it("a leader whose request goes away is taken over while its worker lives", function()
    local leader = ns.open(port, "/shm/gone?key=g1")
    shm.eventually(function()
      return shm.book(port, "leader:goneg1:1") ~= nil
    end, "the first execution")
    local conns = {}
    for i = 1, 20 do
      conns[i] = ns.open(port, "/shm/gone?key=g1")
    end
    shm.eventually(function()
      return tonumber(shm.book(port, "arrived:goneg1")) == 21
    end, "the waiters")
    local closed_at = socket.gettime()
    leader:close() -- nginx ends the request (lua_check_client_abort on)
    local answers = ns.collect(conns, 20)
    local victim = shm.book(port, "leader:goneg1:1")
    assert.same({ [200] = 20 }, (function()
      local t = {}
      for _, a in ipairs(answers) do
        t[a.status] = (t[a.status] or 0) + 1
      end
      return t
    end)())
    local values = distinct(answers, "value")
    assert.equal(1, #values)
    assert.matches("^exec 2 by %d+$", values[1])
    -- both workers took part, the leader's among them
    local pids = distinct(answers, "pid")
    assert.equal(2, #pids)
    assert.is_truthy(({ [pids[1]] = true, [pids[2]] = true })[victim])
    local started = tonumber(shm.book(port, "started:goneg1:2"))
    -- the renewal timer sees the lead gone within its beat (0.15 s); a
    -- generous guard
    assert.is_true(started - closed_at < 3, "taken over after " .. (started - closed_at) .. " s")
    assert.equal("2", shm.book(port, "exec:goneg1"))
    ns.get(port, "/shm/set?key=release:gone")
  end)

  it("holds nothing once the calls are over: the dict is no cache", function()
    local counters = shm.entries(port, "c")
    ns.batch(port, times(50, "/shm/stampede?key=s2&n=50"), 30)
    for i = 1, 20 do
      ns.get(port, "/shm/stampede?key=many" .. i)
    end
    -- every entry expires within seconds of its last use, but the groups'
    -- counters: a fixed number per group, made at new
    shm.eventually(function()
      return shm.entries(port, "") == 0
    end, "an empty dict", 15)
    assert.is_true(counters > 0)
    assert.equal(counters, shm.entries(port, "c"))
  end)
end)
