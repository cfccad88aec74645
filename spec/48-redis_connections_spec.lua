-- The Redis connections of a fleet do not grow with the keys in flight:
-- each worker waits on all its keys through one subscribed connection and
-- sends its commands over its pool, and a Redis that refuses connections
-- (maxclients) costs at most one execution per instance and key. Three
-- nginx instances with two workers each and redis-servers, started for this
-- file on 127.0.0.1 (redis_server.lua; the app is ngx_fleet.lua: /group is a
-- g:call of a group with shm and redis).
local rs = require "redis_server"
local ns = require "nginx_server"
local socket = require "socket"

local usable, why = rs.find()
if not usable then
  describe("Redis connections", function()
    pending("nginx and redis-server (" .. why .. ")")
  end)
  return
end

-- Hang guard for answers that should come within a few seconds.
local GUARD = 30
local INSTANCES, WORKERS = 3, 2

describe("Redis connections", function()
  local redis, fleet

  setup(function()
    redis, fleet = rs.both(INSTANCES)
  end)

  teardown(function()
    rs.stop_both(redis, fleet)
  end)

  -- The clients connected to `server` now, less the one asking.
  local function clients(server)
    local info = server.command("INFO", "clients")
    return tonumber(info:match("connected_clients:(%d+)")) - 1
  end

  -- Opens `per` requests of each key on each instance at once.
  local function open_keys(server, keys, per, q)
    local conns = {}
    for k = 1, keys do
      for _ = 1, per do
        for _, inst in ipairs(fleet.instances) do
          q.key, q.value, q.rport = q.prefix .. k, "v" .. k, server.port
          conns[#conns + 1] = ns.open(inst.port, rs.path("group", q))
        end
      end
    end
    return conns
  end

  local function check_answers(answers, per)
    local n = 0
    for i, a in ipairs(answers) do
      assert.equal(200, a.status, a.raw or a.body)
      assert.equal("true", a.fields.ok, a.body)
      local k = math.floor((i - 1) / (per * INSTANCES)) + 1
      assert.equal("v" .. k, a.fields.value)
      n = n + 1
    end
    return n
  end

  it("200 keys in flight over 3 instances x 2 workers: connections bounded by the pool",
     function()
    local POOL, KEYS = 4, 200
    local conns = open_keys(redis, KEYS, 1, { prefix = "c", pool_size = POOL, sleep = 1.5 })
    -- while the keys are in flight, the most connections Redis saw
    local most, t0 = 0, socket.gettime()
    while socket.gettime() - t0 < 1.4 do
      most = math.max(most, clients(redis))
      socket.sleep(0.02)
    end
    local answers = ns.collect(conns, GUARD)
    assert.equal(KEYS * INSTANCES, check_answers(answers, 1))
    for k = 1, KEYS do
      assert.equal(1, (fleet.executions("c" .. k)), "executions of c" .. k)
    end
    -- per worker: its pool and one subscribed connection (and one more, a
    -- connection on its way out that Redis still counts)
    local bound = INSTANCES * WORKERS * (POOL + 2)
    print(string.format("\nRedis connections: at most %d for %d keys in flight (bound %d)",
                        most, KEYS, bound))
    assert.is_true(most <= bound, most .. " connections for " .. KEYS .. " keys")
    assert.is_true(most >= 1, "no connection seen")
  end)

  it("the subscribed connection killed mid-wait: the worker subscribes again, nothing is missed",
     function()
    local i1 = fleet.instances[1]
    local q = { rport = redis.port, key = "killed-sub", prefix = "r:", sleep = 1, value = "one" }
    local leader = ns.open(i1.port, rs.path("run", q))
    ns.eventually(function() return fleet.executions("killed-sub") == 1 end, "the leader", GUARD)
    local waiters = {}
    for _ = 1, 3 do
      for i = 2, INSTANCES do
        waiters[#waiters + 1] = ns.open(fleet.instances[i].port, rs.path("run", q))
      end
    end
    ns.eventually(function()
      local n = 0
      for _, inst in ipairs(fleet.instances) do
        n = n + (tonumber(ns.get(inst.port, "/stats?prefix=r:", GUARD).fields.waiting) or 0)
      end
      return n == #waiters
    end, "the waiters", GUARD)
    assert.is_true(redis.command("CLIENT", "KILL", "TYPE", "pubsub") >= 1)
    local got = ns.collect(waiters, GUARD)
    for _, a in ipairs(got) do
      assert.equal(200, a.status, a.raw or a.body)
      assert.equal("waited", a.fields.how)
      assert.equal("one", a.fields.value)
      -- woken by the outcome's message, not by the lease's end (5 s)
      assert.is_true(tonumber(a.fields.gap_ms) < 1000, a.fields.gap_ms .. " ms after the end")
    end
    assert.equal("led", ns.collect({ leader }, GUARD)[1].fields.how)
    assert.equal(1, (fleet.executions("killed-sub")))
  end)

  it("a Redis whose maxclients the keys in flight would pass: still one execution per key",
     function()
    -- room for every worker's pool and subscribed connection, not for a
    -- connection per key
    local POOL, KEYS = 4, 200
    local limit = INSTANCES * WORKERS * (POOL + 3)
    local tight = assert(rs.redis { config = { "maxclients " .. limit } })
    finally(tight.close)
    local conns = open_keys(tight, KEYS, 1, { prefix = "t", pool_size = POOL, sleep = 1 })
    local answers = ns.collect(conns, GUARD)
    assert.equal(KEYS * INSTANCES, check_answers(answers, 1))
    local total = 0
    for k = 1, KEYS do
      total = total + fleet.executions("t" .. k)
    end
    assert.equal(KEYS, total, total .. " executions for " .. KEYS .. " keys")
  end)

  it("a Redis at maxclients: at most one execution per instance and key, every caller answered",
     function()
    local full = assert(rs.redis { config = { "maxclients 12" } })
    finally(full.close)
    local KEYS, PER = 100, 2
    local conns = open_keys(full, KEYS, PER, { prefix = "m", sleep = 0.8 })
    local answers = ns.collect(conns, GUARD)
    assert.equal(KEYS * PER * INSTANCES, check_answers(answers, PER))
    local worst, total = 0, 0
    for k = 1, KEYS do
      local n = fleet.executions("m" .. k)
      worst, total = math.max(worst, n), total + n
    end
    print(string.format("\nRedis at maxclients: %d executions for %d keys (worst %d per key)",
                        total, KEYS, worst))
    assert.is_true(worst <= INSTANCES, worst .. " executions of one key")
  end)
end)
