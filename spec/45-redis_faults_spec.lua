-- The Redis tier when things go away: a leader's machine killed mid-call,
-- Redis stopped mid-call and started again, a wrong password, no Redis at
-- all; and the settings that reach Redis (password, db, a unix socket).
-- Three nginx instances with two workers each and redis-servers, started for
-- this file on 127.0.0.1 (redis_server.lua; the app is ngx_fleet.lua).
local rs = require "redis_server"
local ns = require "nginx_server"
local socket = require "socket"

-- Hang guard for answers that should come within a few seconds.
local GUARD = 15
local tally = ns.tally
local function eventually(pred, what, secs)
  return ns.eventually(pred, what, secs or GUARD)
end

local usable, why = rs.find()
if not usable then
  describe("Redis fleet faults", function()
    pending("nginx and redis-server (" .. why .. ")")
  end)
  return
end

local function url_escape(s)
  return (s:gsub("[^%w%-_%.]", function(c) return string.format("%%%02X", c:byte()) end))
end

local function query(q)
  local parts = {}
  for k, v in pairs(q) do
    parts[#parts + 1] = k .. "=" .. url_escape(tostring(v))
  end
  return "/run?" .. table.concat(parts, "&")
end

local function count(text, pattern)
  local n = 0
  for _ in text:gmatch(pattern) do
    n = n + 1
  end
  return n
end

local FAILED = "singleflight: redis at [^\n]- failed"

describe("Redis fleet faults", function()
  local redis, fleet

  -- The calls of `prefix` waiting on another instance now, over the fleet
  -- (each worker hears all its keys through one subscription: the
  -- subscribers of a channel are workers, not calls).
  local function waiting(prefix)
    local n = 0
    for _, inst in ipairs(fleet.instances) do
      local a = ns.get(inst.port, "/stats?prefix=" .. prefix, GUARD)
      n = n + (tonumber(a.fields.waiting) or 0)
    end
    return n
  end

  -- `per` requests on each of `instances` at once.
  local function open_all(instances, per, q)
    local conns = {}
    for _ = 1, per do
      for _, inst in ipairs(instances) do
        conns[#conns + 1] = ns.open(inst.port, query(q))
      end
    end
    return conns
  end

  setup(function()
    redis, fleet = rs.both(3, { unixsocket = true })
  end)

  teardown(function()
    rs.stop_both(redis, fleet)
  end)

  it("Redis down when the fleet starts: every request answers, run where it is", function()
    local s = socket.bind("127.0.0.1", 0)
    local _, port = s:getsockname()
    s:close() -- nothing listens there now
    local answers = ns.collect(open_all(fleet.instances, 2, {
      rport = port, key = "nobody", sleep = 0.05, prefix = "n:",
    }), GUARD)
    assert.same({ fallback = 6 }, tally(answers, "how"))
    assert.same({ ["1,2,3"] = 6 }, tally(answers, "list"))
    assert.equal(6, (fleet.executions("nobody")))
    for _, inst in ipairs(fleet.instances) do
      local n = count(inst.log(), FAILED .. " %(connect: connection refused%)")
      assert.is_true(n >= 1 and n <= 2, inst.name .. " logged it " .. n .. " times")
    end
  end)

  it("a wrong password: fallback, logged once a minute per worker; the right one works", function()
    local locked = assert(rs.redis { password = "sesame" })
    finally(locked.close)
    local before = {}
    for i, inst in ipairs(fleet.instances) do
      before[i] = count(inst.log(), FAILED)
    end
    for round = 1, 2 do
      local answers = ns.collect(open_all(fleet.instances, 4, {
        rport = locked.port, password = "open sesame", key = "pw" .. round, sleep = 0.05,
        prefix = "w:",
      }), GUARD)
      assert.same({ fallback = 12 }, tally(answers, "how"))
      assert.equal(12, (fleet.executions("pw" .. round)))
    end
    for i, inst in ipairs(fleet.instances) do
      local log = inst.log()
      local n = count(log, FAILED) - before[i]
      -- two workers, each at most once a minute
      assert.is_true(n >= 1 and n <= 2, inst.name .. " logged " .. n .. " times")
      assert.truthy(log:find("(auth: WRONGPASS", 1, true))
    end
    local answers = ns.collect(open_all(fleet.instances, 4, {
      rport = locked.port, password = "sesame", key = "pw-ok", prefix = "w:",
    }), GUARD)
    assert.same({ led = 1, waited = 11 }, tally(answers, "how"))
    assert.equal(1, (fleet.executions("pw-ok")))
  end)

  it("db and a unix socket reach Redis", function()
    local conns = open_all(fleet.instances, 2, {
      rpath = redis.path, db = 3, key = "db3", sleep = 0.3, prefix = "d:",
    })
    eventually(function()
      return redis.command_in(3, "EXISTS", rs.tag("d:", "db3") .. ":lock") == 1
    end, "the lock in db 3")
    assert.equal(0, redis.command("EXISTS", rs.tag("d:", "db3") .. ":lock"))
    local answers = ns.collect(conns, GUARD)
    assert.same({ led = 1, waited = 5 }, tally(answers, "how"))
    assert.equal(1, (fleet.executions("db3")))
  end)

  it("Redis stopped mid-call: requests answer; started again, dedup resumes", function()
    local i1 = fleet.instances[1]
    local q = { rport = redis.port, key = "outage", sleep = 0.3, prefix = "o:" }
    local leader = ns.open(i1.port, query(q))
    eventually(function() return fleet.executions("outage") == 1 end, "the leader")
    local waiters = open_all({ fleet.instances[2], fleet.instances[3] }, 2, q)
    eventually(function() return waiting("o:") == 4 end, "4 waiters")
    redis.stop()
    local answers = ns.collect({ leader, waiters[1], waiters[2], waiters[3], waiters[4] }, GUARD)
    assert.equal("led", answers[1].fields.how)
    for i = 2, 5 do
      assert.equal(200, answers[i].status)
      assert.equal("fallback", answers[i].fields.how)
      assert.equal("1,2,3", answers[i].fields.list)
    end
    -- with Redis gone each waiter ran its own
    assert.equal(5, (fleet.executions("outage")))
    redis.start()
    -- a failure pauses a worker's use of Redis for a second
    socket.sleep(1.2)
    q.key, q.sleep = "outage-after", 0.2
    local again = ns.collect(open_all(fleet.instances, 4, q), GUARD)
    assert.same({ led = 1, waited = 11 }, tally(again, "how"))
    assert.equal(1, (fleet.executions("outage-after")))
  end)

  it("Redis frozen: calls answer after `timeout`, run where they are; thawed, dedup resumes",
     function()
    -- a lease far beyond the hang guard: the locks that the timed-out calls
    -- left behind (Redis runs their scripts when it thaws) must be given up
    -- by their instances, not waited out
    local q = { rport = redis.port, key = "frozen", sleep = 0.05, prefix = "z:", timeout = 0.1,
                lease = 60 }
    -- the settings in every worker, their connections pooled
    ns.collect(open_all(fleet.instances, 4, q), GUARD)
    local before = {}
    for i, inst in ipairs(fleet.instances) do
      before[i] = count(inst.log(), FAILED .. " %([^)]*timeout%)")
    end
    redis.freeze()
    local frozen_at = socket.gettime()
    local ok, answers = pcall(ns.collect, open_all(fleet.instances, 4, q), GUARD)
    local took = socket.gettime() - frozen_at
    redis.freeze(false)
    assert(ok, answers)
    assert.same({ fallback = 12 }, tally(answers, "how"))
    assert.same({ ["1,2,3"] = 12 }, tally(answers, "list"))
    -- a generous guard: the timeout is 0.1 s, then each falls back at once
    assert.is_true(took < 5, "the frozen round took " .. took .. " s")
    local logged = 0
    for i, inst in ipairs(fleet.instances) do
      logged = logged + count(inst.log(), FAILED .. " %([^)]*timeout%)") - before[i]
    end
    assert.is_true(logged >= 1, "no timeout logged")
    -- thawed, it runs the scripts it held (one takes the lock for a call
    -- that fell back), and the abandons sent after them: no lock is left
    eventually(function()
      return redis.command("EXISTS", rs.tag("z:", "frozen") .. ":lock") == 0
    end, "the stale lock given up")
    -- a failure pauses a worker's use of Redis for a second
    socket.sleep(1.2)
    local runs = fleet.executions("frozen")
    q.sleep = 0.2
    answers = ns.collect(open_all(fleet.instances, 4, q), GUARD)
    assert.same({ led = 1, waited = 11 }, tally(answers, "how"))
    assert.equal(runs + 1, (fleet.executions("frozen")))
  end)

  it("a leader's machine killed mid-call: another instance takes over after the lease", function()
    local i1, i2, i3 = fleet.instances[1], fleet.instances[2], fleet.instances[3]
    local q = { rport = redis.port, key = "killed", sleep = 30, lease = 0.5, prefix = "x:",
                value = "v" }
    local leader = ns.open(i1.port, query(q))
    eventually(function() return fleet.executions("killed") == 1 end, "the leader")
    q.sleep = 0.1
    local waiters = open_all({ i2, i3 }, 3, q)
    eventually(function() return waiting("x:") == 6 end, "6 waiters")
    local t0 = socket.gettime()
    i1.kill()
    local answers = ns.collect(waiters, GUARD)
    local took = socket.gettime() - t0
    leader:close()
    assert.same({ led = 1, waited = 5 }, tally(answers, "how"))
    assert.same({ v = 6 }, tally(answers, "value"))
    assert.equal(2, (fleet.executions("killed")))
    local _, lines = fleet.executions("killed")
    assert.matches("^killed i[23] ", lines[2])
    -- the lease ran out first (0.5 s, renewed every third of it until the
    -- kill): a live leader would have renewed it
    assert.is_true(took >= 0.3, "took over after " .. took .. " s")
    local takeovers = 0
    for _, inst in ipairs { i2, i3 } do
      local a = ns.get(inst.port, "/stats?prefix=x:", GUARD)
      takeovers = takeovers + tonumber(a.fields.takeovers)
    end
    assert.equal(1, takeovers)
  end)
end)
