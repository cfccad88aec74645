-- The Redis tier kept apart and in step with the group: named groups and
-- prefixes are namespaces, forget and timeout reach across instances,
-- shared is true on both sides, a lock left by a timed-out script is given
-- up when Redis answers, results can be authenticated with a secret, and an
-- eviction policy that can drop leases is reported. Three nginx instances
-- with two workers each and a redis-server, started for this file on
-- 127.0.0.1 (redis_server.lua; the app is ngx_fleet.lua: /group is a g:call
-- of a group with shm and redis, /run one fleet:outcome).
local rs = require "redis_server"
local ns = require "nginx_server"
local socket = require "socket"

local usable, why = rs.find()
if not usable then
  describe("Redis namespaces", function()
    pending("nginx and redis-server (" .. why .. ")")
  end)
  return
end

local core = require "singleflight.core"
-- Hang guard for answers that should come within a few seconds.
local GUARD = 15
local tally = ns.tally
local function eventually(pred, what)
  return ns.eventually(pred, what, GUARD)
end

describe("Redis namespaces", function()
  local redis, fleet, i1, i2, i3

  -- /`endpoint` with the query `q` (a table) against `server` (default: the
  -- file's redis-server).
  local function path(endpoint, q, server)
    q.rport = (server or redis).port
    return rs.path(endpoint, q)
  end

  local function open(inst, endpoint, q)
    return ns.open(inst.port, path(endpoint, q))
  end

  local function get(inst, endpoint, q)
    local a = ns.get(inst.port, path(endpoint, q), GUARD)
    assert.equal(200, a.status, a.raw or a.body)
    return a
  end

  local function collect(conns)
    local answers = ns.collect(conns, GUARD)
    for _, a in ipairs(answers) do
      assert.equal(200, a.status, a.raw or a.body)
    end
    return answers
  end

  local function running(key, n)
    eventually(function() return fleet.executions(key) == (n or 1) end,
               "execution " .. (n or 1) .. " of " .. key)
  end

  -- The Redis keys (or channels) whose names hold `word`.
  local function names(word, channels)
    if channels then
      return redis.command("PUBSUB", "CHANNELS", "*" .. word .. "*")
    end
    return redis.command("KEYS", "*" .. word .. "*")
  end

  setup(function()
    redis, fleet = rs.both(3)
    i1, i2, i3 = fleet.instances[1], fleet.instances[2], fleet.instances[3]
  end)

  teardown(function()
    rs.stop_both(redis, fleet)
  end)

  -- regression: the renewal of a worker's lock took the lead for gone
  -- while it waited on Redis (only fn ran in a frame it looked for): the
  -- lock went, another worker of the instance took it and waited on
  -- Redis too, or ran fn a second time
  it("a long wait on another instance holds the worker tier: one Redis waiter per instance",
     function()
    local q = { key = "held", prefix = "h:", value = "one", sleep = 1.5 }
    local leader = open(i1, "group", q)
    running("held")
    local dups = {}
    for i = 1, 24 do
      dups[i] = open(i % 2 == 0 and i2 or i3, "group", q)
    end
    local channel
    eventually(function()
      channel = names("held", true)[1]
      -- the leader hears of forgets; i2 and i3 wait, one each
      return channel ~= nil and redis.command("PUBSUB", "NUMSUB", channel)[2] >= 3
    end, "the waiters")
    socket.sleep(0.6) -- four renewals of the worker tier's locks
    assert.equal(3, redis.command("PUBSUB", "NUMSUB", channel)[2])
    local got = collect(dups)
    assert.same({ one = 24 }, tally(got, "value"))
    assert.equal("one", collect({ leader })[1].fields.value)
    assert.equal(1, (fleet.executions("held")))
  end)

  it("named groups with the same settings do not share a key", function()
    local q = { key = "groups", prefix = "n:", sleep = 0.6 }
    q.group, q.value = "users", "users"
    local users = open(i1, "group", q)
    running("groups")
    q.group, q.value, q.sleep = "orders", "orders", 0.05
    local orders = get(i2, "group", q)
    assert.equal("orders", orders.fields.value)
    q.group, q.value = nil, "plain"
    local plain = get(i3, "group", q)
    assert.equal("plain", plain.fields.value)
    assert.equal("users", collect({ users })[1].fields.value)
    assert.equal(3, (fleet.executions("groups")))
  end)

  it("no prefix, group name or key makes another's Redis names", function()
    -- prefix "app:" with key "x:secret" against prefix "app:x:" with "secret"
    local first = open(i1, "run", { prefix = "app:", key = "x:secret", value = "one", sleep = 0.6 })
    running("x:secret")
    local other = get(i2, "run", { prefix = "app:x:", key = "secret", value = "two", sleep = 0.05 })
    assert.equal("led", other.fields.how)
    assert.equal("two", other.fields.value)
    assert.equal("one", collect({ first })[1].fields.value)
    -- group "a|b" with key "c" against group "a" with key "b|c"
    first = open(i1, "group", { prefix = "j:", group = "a|b", key = "c", value = "ab",
                                sleep = 0.6 })
    running("c")
    other = get(i2, "group", { prefix = "j:", group = "a", key = "b|c", value = "a", sleep = 0.05 })
    assert.equal("a", other.fields.value)
    assert.equal("ab", collect({ first })[1].fields.value)
    -- every key of one call has one hash tag: one slot of a Redis Cluster
    local keys = names("x:secret")
    assert.is_true(#keys >= 1)
    for _, k in ipairs(keys) do
      assert.equal(keys[1]:match("%b{}"), k:match("%b{}"))
    end
  end)

  it("forget reaches every instance; the forgotten call still answers its waiters", function()
    local q = { key = "forget", prefix = "f:", value = "first", sleep = 1.2 }
    local leader = open(i1, "group", q)
    running("forget")
    q.value = "none"
    local waiter = open(i2, "group", q)
    socket.sleep(0.3) -- the waiter reaches Redis
    local a = get(i3, "gforget", { key = "forget", prefix = "f:" })
    assert.equal("true", a.fields.forgot)
    socket.sleep(0.1) -- pub/sub: the instances hear of it
    -- the next callers, on the waiter's instance and the leader's, start anew
    q.value, q.sleep = "second", 0.6
    local later = { open(i2, "group", q), open(i1, "group", q) }
    local got = collect(later)
    assert.same({ "second", "second" }, { got[1].fields.value, got[2].fields.value })
    got = collect({ leader, waiter })
    assert.same({ "first", "first" }, { got[1].fields.value, got[2].fields.value })
    assert.equal(2, (fleet.executions("forget")))
  end)

  it("timeout bounds a wait on another instance; on_timeout = \"run\" runs fn there", function()
    local q = { key = "timeout", prefix = "t:", value = "slow", sleep = 3 }
    local leader = open(i1, "group", q)
    running("timeout")
    local t0 = socket.gettime()
    local timed = get(i2, "group", { key = "timeout", prefix = "t:", wait = 0.5, value = "x" })
    local took = socket.gettime() - t0
    assert.equal("true", timed.fields.ok)
    assert.equal("singleflight: wait timed out", timed.fields.err)
    assert.equal("false", timed.fields.shared)
    assert.is_nil(timed.fields.value)
    assert.equal("1", timed.fields.timeouts)
    -- well before the leader's 3 s: it did not wait for it
    assert.is_true(took < 2, "the timed-out caller answered after " .. took .. " s")
    local own = get(i3, "group", { key = "timeout", prefix = "t:", wait = 0.5, on_timeout = "run",
                                   value = "own", sleep = 0.05 })
    assert.equal("own", own.fields.value)
    assert.equal("false", own.fields.shared)
    assert.equal(2, (fleet.executions("timeout")))
    assert.equal("slow", collect({ leader })[1].fields.value)
  end)

  it("shared is true on both sides of a result handed across instances", function()
    local q = { key = "shared", prefix = "h:", sleep = 0.5 }
    local leader = open(i1, "group", q)
    running("shared")
    local waiter = open(i2, "group", q)
    local got = collect({ leader, waiter })
    assert.same({ "true", "true" }, { got[1].fields.shared, got[2].fields.shared })
    assert.equal(1, (fleet.executions("shared")))
    -- alone, it is not shared
    q.key, q.sleep = "alone", 0.05
    assert.equal("false", get(i3, "group", q).fields.shared)
  end)

  it("a lock taken by a script that timed out is given up as soon as Redis answers", function()
    -- a lease far beyond the hang guard: waiting it out fails the spec
    local q = { key = "orphan", prefix = "o:", timeout = 0.1, lease = 60, sleep = 0.05 }
    redis.freeze()
    local ok, frozen = pcall(ns.get, i1.port, path("run", q), GUARD)
    redis.freeze(false)
    assert(ok, frozen)
    assert.equal("fallback", frozen.fields.how)
    -- thawed, Redis runs the script it held: it takes the lock for a call
    -- that already ran on its own
    local after = get(i2, "run", q)
    assert.equal("led", after.fields.how)
    eventually(function() return #names("orphan") <= 1 end, "the stale lock gone")
    assert.equal(2, (fleet.executions("orphan")))
  end)

  it("with a secret, a forged result is refused: the waiters get the real one", function()
    local q = { key = "mac", prefix = "m:", secret = "sesame", value = "real", sleep = 1.2 }
    local leader = open(i1, "run", q)
    running("mac")
    q.value = "none"
    local waiter = open(i2, "run", q)
    local lock
    eventually(function()
      for _, k in ipairs(names("mac")) do
        if k:match(":lock$") then
          lock = k
        end
      end
      return lock ~= nil
    end, "the lock")
    local token = redis.command("GET", lock)
    local channel
    eventually(function()
      channel = names("mac", true)[1]
      return channel ~= nil and redis.command("PUBSUB", "NUMSUB", channel)[2] >= 1
    end, "the waiter")
    socket.sleep(0.2)
    local forged = core.encode(true, { value = "forged", by = "mallory", at = 0,
                                       list = { 1, 2, { 3 } } }, "second")
    redis.command("PUBLISH", channel, "r" .. token .. "\n" .. forged)
    redis.command("PUBLISH", channel, "r" .. token .. "\n" .. string.rep("x", 20) .. forged)
    local got = collect({ leader, waiter })
    assert.same({ led = 1, waited = 1 }, tally(got, "how"))
    assert.same({ real = 2 }, tally(got, "value"))
    -- a waiter with another secret refuses the leader's result too: it runs
    -- its own
    q.key, q.sleep, q.lease, q.value = "mac2", 0.3, 1, "real"
    leader = open(i1, "run", q)
    running("mac2")
    q.secret, q.value = "other", "own"
    local stranger = get(i2, "run", q)
    assert.equal("fallback", stranger.fields.how)
    assert.equal("own", stranger.fields.value)
    assert.equal("real", collect({ leader })[1].fields.value)
    assert.truthy(i2.log():find("failed to authenticate", 1, true))
  end)

  it("an eviction policy that can drop leases is reported once", function()
    local evicting = assert(rs.redis { config = { "maxmemory 64mb",
                                                  "maxmemory-policy allkeys-lru" } })
    finally(evicting.close)
    for round = 1, 2 do
      local a = ns.get(i1.port, path("run", { key = "evict" .. round, prefix = "e:",
                                              sleep = 0.01 }, evicting), GUARD)
      assert.equal("led", a.fields.how)
    end
    local warning = "redis at 127.0.0.1:" .. evicting.port .. " evicts keys"
    local log, n = i1.log(), 0
    for _ in log:gmatch(warning:gsub("%p", "%%%0")) do
      n = n + 1
    end
    -- once per worker that used it
    assert.is_true(n >= 1 and n <= 2, "logged " .. n .. " times")
    assert.truthy(log:find("allkeys-lru", 1, true))
    -- noeviction, the default: nothing said
    get(i1, "run", { key = "noevict", prefix = "e:", sleep = 0.01 })
    local quiet = "redis at 127.0.0.1:" .. redis.port .. " evicts keys"
    for _, inst in ipairs(fleet.instances) do
      assert.falsy(inst.log():find(quiet, 1, true))
    end
  end)
end)
