-- The Redis tier (singleflight.redis) across machines: three nginx
-- instances with two workers each, standing for three machines, and one
-- redis-server, all started for this file on 127.0.0.1 (redis_server.lua).
-- Each request of /run is one fleet:outcome(key, produce) (ngx_fleet.lua):
-- every request is a participant of its own here, as the instance-wide
-- leader of the tier above would be.
local rs = require "redis_server"
local ns = require "nginx_server"

-- Hang guard for answers that should come within a second or two.
local GUARD = 10
local tally = ns.tally
local function eventually(pred, what, secs)
  return ns.eventually(pred, what, secs or GUARD)
end

local usable, why = rs.find()
if not usable then
  describe("Redis fleet", function()
    pending("nginx and redis-server (" .. why .. ")")
  end)
  return
end

local function stats(inst, prefix)
  local a = ns.get(inst.port, "/stats?prefix=" .. (prefix or "singleflight:"), GUARD)
  assert.equal(200, a.status)
  local st = {}
  for k, v in pairs(a.fields) do
    st[k] = tonumber(v)
  end
  return st
end

local function sum_stats(fleet, prefix)
  local total = {}
  for _, inst in ipairs(fleet.instances) do
    for k, v in pairs(stats(inst, prefix)) do
      total[k] = (total[k] or 0) + v
    end
  end
  return total
end

local function url_escape(s)
  return (s:gsub("[^%w%-_%.]", function(c) return string.format("%%%02X", c:byte()) end))
end

-- Steps until pred() holds, for `secs` seconds at most.

describe("Redis fleet", function()
  local redis, fleet

  -- /run (or /`endpoint`) on an instance of the fleet, with the query `q`
  -- (a table).
  local function path(q, endpoint)
    local parts = { "rport=" .. redis.port }
    for k, v in pairs(q) do
      parts[#parts + 1] = k .. "=" .. url_escape(tostring(v))
    end
    return "/" .. (endpoint or "run") .. "?" .. table.concat(parts, "&")
  end

  -- `per` requests on each instance at once, all with the query q.
  local function stampede(per, q, endpoint)
    local conns = {}
    for _ = 1, per do
      for _, inst in ipairs(fleet.instances) do
        conns[#conns + 1] = ns.open(inst.port, path(q, endpoint))
      end
    end
    local answers = ns.collect(conns, GUARD)
    for _, a in ipairs(answers) do
      assert.equal(200, a.status, a.raw or a.body)
    end
    return answers
  end

  setup(function()
    redis, fleet = rs.both(3)
  end)

  teardown(function()
    if fleet then
      for _, inst in ipairs(fleet.instances) do
        local log = inst.log()
        if log:find("%[error%]") or log:find("%[alert%]") then
          print("\nnginx " .. inst.name .. " error log:\n" .. log)
        end
      end
    end
    rs.stop_both(redis, fleet)
  end)

  it("a stampede over three instances makes one execution, its outcome everywhere", function()
    local answers = stampede(10, { key = "stampede", value = "fresh", prefix = "s:" })
    assert.equal(1, (fleet.executions("stampede")))
    assert.same({ led = 1, waited = 29 }, tally(answers, "how"))
    local _, lines = fleet.executions("stampede")
    local leader = lines[1]:match("^%S+ (%S+)")
    -- a table crossed the instances, as the bytes of core.encode
    assert.same({ [leader] = 30 }, tally(answers, "by"))
    assert.same({ fresh = 30 }, tally(answers, "value"))
    assert.same({ ["1,2,3"] = 30 }, tally(answers, "list"))
    assert.same({ second = 30 }, tally(answers, "err"))
    -- the waiters return right after the leader's end: the message wakes
    -- them (a generous guard; the figure is printed)
    local worst = 0
    for _, a in ipairs(answers) do
      worst = math.max(worst, tonumber(a.fields.gap_ms))
    end
    print(string.format("\nRedis fleet: slowest waiter answered %.1f ms after the leader's end",
                        worst))
    assert.is_true(worst < 200, "slowest waiter answered " .. worst .. " ms late")
    local st = sum_stats(fleet, "s:")
    assert.equal(1, st.led)
    assert.equal(29, st.waited)
    assert.equal(0, st.fallbacks)
    assert.equal(0, st.takeovers)
    -- nothing is left in Redis but the outcome, which expires
    local tag = rs.tag("s:", "stampede")
    local keys = redis.command("KEYS", tag .. "*")
    assert.equal(1, #keys)
    assert.equal(tag .. ":result:", keys[1]:sub(1, #tag + 8))
    local ttl = redis.command("PTTL", keys[1])
    assert.is_true(ttl > 0 and ttl <= 5000, "result ttl " .. tostring(ttl))
  end)

  it("a panic crosses as a panic", function()
    local answers = stampede(4, { key = "panic", mode = "panic", prefix = "p:" })
    assert.equal(1, (fleet.executions("panic")))
    assert.same({ ["false"] = 12 }, tally(answers, "ok"))
    assert.same({ ["42"] = 12 }, tally(answers, "code"))
    assert.same({ ["the leader's traceback"] = 12 }, tally(answers, "traceback"))
    assert.same({ led = 1, waited = 11 }, tally(answers, "how"))
  end)

  it("Redis sees at most four commands per participant", function()
    -- once, so that every worker has its scripts and connections
    stampede(2, { key = "warm", prefix = "c:", sleep = 0.05 })
    -- the commands clients sent (not those the scripts ran)
    local function sent()
      local info, n = redis.command("INFO", "commandstats"), 0
      for _, name in ipairs { "evalsha", "eval", "subscribe", "unsubscribe", "auth", "select" } do
        n = n + tonumber(info:match("cmdstat_" .. name .. ":calls=(%d+)") or 0)
      end
      return n
    end
    local before = sent()
    local answers = stampede(5, { key = "commands", prefix = "c:" })
    local used = sent() - before
    assert.same({ led = 1, waited = 14 }, tally(answers, "how"))
    -- the leader: acquire, release; each waiter: acquire, subscribe, step,
    -- unsubscribe
    assert.is_true(used <= 2 + 4 * 14, used .. " commands for 15 participants")
  end)

  it("a live leader renews its lease: a slow call is never run twice", function()
    local answers = stampede(3, { key = "slow", prefix = "l:", lease = 0.15, sleep = 0.6 })
    assert.equal(1, (fleet.executions("slow")))
    assert.same({ led = 1, waited = 8 }, tally(answers, "how"))
    assert.equal(0, sum_stats(fleet, "l:").takeovers)
  end)

  it("two prefixes on one server are independent", function()
    local conns = {}
    for _, prefix in ipairs { "one:", "two:" } do
      for _ = 1, 4 do
        for _, inst in ipairs(fleet.instances) do
          conns[#conns + 1] = ns.open(inst.port, path { key = "shared-key", prefix = prefix,
                                                        value = prefix })
        end
      end
    end
    local answers = ns.collect(conns, GUARD)
    assert.equal(2, (fleet.executions("shared-key")))
    assert.same({ led = 2, waited = 22 }, tally(answers, "how"))
    for i, a in ipairs(answers) do
      assert.equal(i <= 12 and "one:" or "two:", a.fields.value)
    end
  end)

  it("keys with braces, percent signs and spaces stay apart and in one slot", function()
    local keys = { "a}b", "a%7Db", "{x}", "%", "two words" }
    local conns = {}
    for _, key in ipairs(keys) do
      for _, inst in ipairs(fleet.instances) do
        conns[#conns + 1] = ns.open(inst.port, path { key = key, value = key, prefix = "k:",
                                                      sleep = 0.1 })
      end
    end
    local answers = ns.collect(conns, GUARD)
    for i, a in ipairs(answers) do
      assert.equal(200, a.status)
      assert.equal(keys[math.floor((i - 1) / 3) + 1], a.fields.value)
    end
    assert.same({ led = 5, waited = 10 }, tally(answers, "how"))
  end)

  it("forget: later callers start anew; the forgotten call still reaches its waiters", function()
    local i1, i2, i3 = fleet.instances[1], fleet.instances[2], fleet.instances[3]
    local first = ns.open(i1.port, path { key = "forget", value = "first", prefix = "f:",
                                          sleep = 0.5 })
    eventually(function() return fleet.executions("forget") == 1 end, "the first leader")
    local waiter = ns.open(i2.port, path { key = "forget", value = "none", prefix = "f:" })
    eventually(function()
      local n = redis.command("PUBSUB", "NUMSUB", rs.tag("f:", "forget") .. ":done:0")
      return n[2] == 1
    end, "the waiter's subscription")
    local a = ns.get(i3.port, "/forget?rport=" .. redis.port .. "&prefix=f:&key=forget", GUARD)
    assert.equal("true", a.fields.forgot)
    -- a new execution, which outlives the first
    local second = ns.open(i3.port, path { key = "forget", value = "second", prefix = "f:",
                                           sleep = 0.8 })
    eventually(function() return fleet.executions("forget") == 2 end, "the second leader")
    local got = ns.collect({ first, waiter }, GUARD)
    assert.same({ "led", "waited" }, { got[1].fields.how, got[2].fields.how })
    assert.same({ "first", "first" }, { got[1].fields.value, got[2].fields.value })
    -- the first's end left the second's lock alone: a newcomer joins it
    local late = ns.get(i1.port, path { key = "forget", value = "late", prefix = "f:" }, GUARD)
    assert.equal("waited", late.fields.how)
    assert.equal("second", late.fields.value)
    assert.equal("led", ns.collect({ second }, GUARD)[1].fields.how)
    assert.equal(2, (fleet.executions("forget")))
    a = ns.get(i3.port, "/forget?rport=" .. redis.port .. "&prefix=f:&key=forget", GUARD)
    assert.equal("false", a.fields.forgot)
  end)

  -- The whole stack: singleflight.new { shm = ..., redis = ... } on every
  -- instance, each with two workers.
  local function group_stampede(per, q)
    return stampede(per, q, "group")
  end

  it("g:call with shm and redis: one execution over every worker of every instance", function()
    local answers = group_stampede(8, { key = "whole", prefix = "g:" })
    assert.equal(1, (fleet.executions("whole")))
    local by
    for _, a in ipairs(answers) do
      assert.equal("true", a.fields.ok)
      assert.equal("v", a.fields.value)
      assert.equal("second", a.fields.err)
      assert.equal("1,2,3", a.fields.list)
      by = by or a.fields.by
      assert.equal(by, a.fields.by) -- one instance's table, copied everywhere
    end
    -- a later stampede is a new execution
    group_stampede(2, { key = "whole", prefix = "g:" })
    assert.equal(2, (fleet.executions("whole")))
  end)

  it("g:call with shm and redis: a panic reaches every instance as a panic", function()
    local answers = group_stampede(3, { key = "gpanic", mode = "panic", prefix = "g:" })
    assert.equal(1, (fleet.executions("gpanic")))
    for _, a in ipairs(answers) do
      assert.equal("false", a.fields.ok)
      assert.equal("true", a.fields.panic)
      assert.equal("42", a.fields.code)
    end
  end)
end)
