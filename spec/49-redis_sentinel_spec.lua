-- The fleet behind Redis Sentinel: the settings name no server, only
-- sentinels and a master's name; the master is the one the sentinels name,
-- found again when it moves. A master, a replica and two sentinels (with a
-- password of their own) on 127.0.0.1, and three nginx instances with two
-- workers each, started for this file (redis_server.lua; the app is
-- ngx_fleet.lua: /run is one fleet:outcome).
local rs = require "redis_server"
local ns = require "nginx_server"
local socket = require "socket"

local why = rs.unusable({ "/usr/bin/redis-sentinel",
                          "no redis-sentinel (Debian's redis-sentinel)" })
if why then
  describe("Redis Sentinel", function()
    pending(why)
  end)
  return
end

local GUARD = 15
local tally = ns.tally

local function eventually(pred, what, secs)
  return ns.eventually(pred, what, secs or GUARD)
end

describe("Redis Sentinel", function()
  local master, replica, sentinels, fleet = nil, nil, {}, nil
  -- a port nothing listens on, for a sentinel that is not there
  local gone = rs.free_port()

  -- The servers' roles as they say: "master" or "slave".
  local function role(server)
    local r = server.command("ROLE")
    return type(r) == "table" and r[1]
  end

  -- The port the sentinel names for mymaster.
  local function named(sentinel)
    local a = sentinel.command("SENTINEL", "get-master-addr-by-name", "mymaster")
    return type(a) == "table" and tonumber(a[2])
  end

  setup(function()
    master = assert(rs.redis())
    replica = assert(rs.redis { config = { "replicaof 127.0.0.1 " .. master.port } })
    for i = 1, 2 do
      sentinels[i] = assert(rs.redis { password = "watch",
                                       sentinel = { name = "mymaster", port = master.port } })
    end
    fleet = assert(rs.fleet(3))
    -- the sentinels know the replica, in sync
    eventually(function()
      for _, s in ipairs(sentinels) do
        local reps = s.command("SENTINEL", "replicas", "mymaster")
        if type(reps) ~= "table" or #reps ~= 1 then
          return false
        end
      end
      local info = replica.command("INFO", "replication")
      return type(info) == "string" and info:find("master_link_status:up", 1, true) ~= nil
    end, "the sentinels to know the replica")
  end)

  teardown(function()
    if fleet then
      fleet.stop()
    end
    for _, s in ipairs(sentinels) do
      s.close()
    end
    if replica then
      replica.close()
    end
    if master then
      master.close()
    end
  end)

  -- The query of /run through the sentinels: a first one that is not
  -- there (the next is asked), then the two.
  local function query(key, extra)
    local q = {
      sentinels = "127.0.0.1:" .. gone .. ",127.0.0.1:" .. sentinels[1].port
                  .. ",127.0.0.1:" .. sentinels[2].port,
      master_name = "mymaster", sentinel_password = "watch", key = key, prefix = "st:",
      sleep = 0.3, timeout = 0.3,
    }
    for k, v in pairs(extra or {}) do
      q[k] = v
    end
    return q
  end

  -- `per` requests of /`endpoint` (default run) with the query q on each
  -- instance at once: each answered with a value.
  local function stampede(per, q, endpoint)
    return rs.answered(ns.collect(rs.open_all(fleet.instances, per,
                                              rs.path(endpoint or "run", q)), GUARD))
  end

  local function stats()
    local total = {}
    for _, inst in ipairs(fleet.instances) do
      local a = ns.get(inst.port, "/stats?prefix=st:", GUARD)
      for k, v in pairs(a.fields) do
        total[k] = (total[k] or 0) + tonumber(v)
      end
    end
    return total
  end

  it("a stampede over three instances: one execution, on the master the sentinels name",
     function()
    local answers = stampede(10, query("one"))
    assert.equal(1, (fleet.executions("one")))
    assert.same({ led = 1, waited = 29 }, tally(answers, "how"))
    assert.equal(0, stats().fallbacks)
    -- the outcome was written on the master (and replicated)
    assert.equal(1, #master.command("KEYS", rs.tag("st:", "one") .. ":result:*"))
  end)

  it("a master's name the sentinels don't know: each instance runs its own, and says why",
     function()
    local answers = stampede(1, query("unknown", { master_name = "nosuch" }))
    assert.same({ fallback = 3 }, tally(answers, "how"))
    local log = fleet.instances[1].log()
    assert.truthy(log:find("knows no master \"nosuch\"", 1, true), log)
  end)

  it("a failover: calls go on meanwhile, then dedup resumes on the new master", function()
    -- the whole stack (/group: shm and redis): while Redis can't be used,
    -- one execution per instance at most
    local function group_stampede(per, key)
      local q = query(key)
      q.master_name, q.sentinel_password, q.timeout = nil, nil, nil
      q.gmaster, q.gsentinel_password = "mymaster", "watch"
      return stampede(per, q, "group")
    end
    -- SENTINEL FAILOVER is refused until the sentinel has seen the replica
    -- fit to promote
    eventually(function()
      return sentinels[1].command("SENTINEL", "FAILOVER", "mymaster") == "OK"
    end, "SENTINEL FAILOVER to be accepted")
    -- stampedes of fresh keys while the master changes hands: every call
    -- answers, each key runs once per instance at most
    local rounds, switched, extra = 0, false, 0
    local deadline = socket.gettime() + 30
    while not switched do
      assert.is_true(socket.gettime() < deadline, "the failover did not end in 30 s")
      rounds = rounds + 1
      local key = "during" .. rounds
      group_stampede(3, key)
      local runs = fleet.executions(key)
      assert.is_true(runs >= 1 and runs <= 3, key .. " ran " .. runs .. " times")
      extra = extra + runs - 1
      switched = named(sentinels[1]) == replica.port and named(sentinels[2]) == replica.port
                 and role(replica) == "master" and role(master) == "slave"
    end
    print(string.format("\nRedis Sentinel: %d stampede(s) of 9 calls during the failover, "
                        .. "%d execution(s) beyond one per key", rounds, extra))
    -- the first calls after the switch may still meet the old master and
    -- run in their instance for a moment (a second after a failure): then
    -- one execution again, on the new master
    eventually(function()
      local key = "after" .. socket.gettime()
      group_stampede(3, key)
      return fleet.executions(key) == 1
    end, "dedup on the new master")
    local answers = stampede(10, query("settled"))
    assert.same({ led = 1, waited = 29 }, tally(answers, "how"))
    assert.equal(1, (fleet.executions("settled")))
    assert.equal(1, #replica.command("KEYS", rs.tag("st:", "settled") .. ":result:*"))
  end)
end)
