-- The fleet over a Redis Cluster: each call's commands go to the node that
-- serves its slot (the keys of one call share one hash tag), found with
-- CLUSTER SLOTS and MOVED/ASK replies, and its channel is a shard channel
-- of that slot (SSUBSCRIBE on that node). A 3-master cluster and three
-- nginx instances with two workers each, started for this file on
-- 127.0.0.1 (redis_server.lua; the app is ngx_fleet.lua: /run is one
-- fleet:outcome).
local rs = require "redis_server"
local ns = require "nginx_server"

local why = rs.unusable()
if why then
  describe("Redis Cluster", function()
    pending(why)
  end)
  return
end

local GUARD = 15
local tally = ns.tally

describe("Redis Cluster", function()
  local cluster, fleet

  setup(function()
    cluster = assert(rs.cluster(3))
    local ok, f = pcall(rs.fleet, 3)
    if not ok then
      cluster.close()
      error(f, 0)
    end
    fleet = f
  end)

  teardown(function()
    rs.stop_both(cluster, fleet)
  end)

  local PREFIX = "c:"

  -- The slot of a key's Redis names.
  local function slot_of(key)
    return cluster.slot(rs.tag(PREFIX, key) .. ":lock")
  end

  -- A key whose slot `node` serves, made of `stem` and a number.
  local function key_on(node, stem)
    for i = 1, 1000 do
      local key = stem .. i
      if cluster.owner(slot_of(key)) == node then
        return key
      end
    end
    error("no key of " .. stem .. " lands on node " .. node.port)
  end

  -- The query of /run: one node given, the others found through it.
  local function query(key, sleep)
    return { cluster = "127.0.0.1:" .. cluster.nodes[1].port, key = key, prefix = PREFIX,
             sleep = sleep or 0.3 }
  end

  -- The answers of every key of `keys` (10 requests of each on each
  -- instance, all at once), by key.
  local function stampedes(keys, sleep)
    local conns, of = {}, {}
    for _, key in ipairs(keys) do
      for _, c in ipairs(rs.open_all(fleet.instances, 10, rs.path("run", query(key, sleep)))) do
        conns[#conns + 1], of[#conns + 1] = c, key
      end
    end
    local by = {}
    for i, a in ipairs(rs.answered(ns.collect(conns, GUARD))) do
      by[of[i]] = by[of[i]] or {}
      table.insert(by[of[i]], a)
    end
    return by
  end

  local function results_on(node, key)
    return #node.command("KEYS", rs.tag(PREFIX, key) .. ":result:*")
  end

  it("a stampede per key, the keys on three nodes: one execution per key, on its node",
     function()
    local keys = {}
    for i, node in ipairs(cluster.nodes) do
      keys[i] = key_on(node, "spread")
    end
    local by = stampedes(keys)
    for i, key in ipairs(keys) do
      assert.equal(1, (fleet.executions(key)), key)
      assert.same({ led = 1, waited = 29 }, tally(by[key], "how"), key)
      for j, node in ipairs(cluster.nodes) do
        assert.equal(i == j and 1 or 0, results_on(node, key), key .. " on node " .. j)
      end
    end
  end)

  it("a slot moved to another node: MOVED followed, one execution again", function()
    local node1, node2 = cluster.nodes[1], cluster.nodes[2]
    local key = key_on(node1, "moving")
    local by = stampedes({ key }) -- the workers know the slot map now
    assert.equal(1, (fleet.executions(key)))
    assert.same({ led = 1, waited = 29 }, tally(by[key], "how"))
    cluster.migrate(slot_of(key), node2)
    assert.equal(node2, cluster.owner(slot_of(key)))
    -- the workers' maps still name node 1: its MOVED replies lead them to
    -- node 2, commands and shard channel alike
    by = stampedes({ key })
    assert.equal(2, (fleet.executions(key)))
    assert.same({ led = 1, waited = 29 }, tally(by[key], "how"))
    assert.equal(0, results_on(node1, key))
    assert.equal(2, results_on(node2, key)) -- the first one's moved with the slot
  end)

  it("a slot moved while its call runs: the waiters follow it, one execution", function()
    local node1, node3 = cluster.nodes[1], cluster.nodes[3]
    local key = key_on(node1, "inflight")
    local conns = rs.open_all(fleet.instances, 10, rs.path("run", query(key, 1.5)))
    local t0 = require("socket").gettime()
    ns.eventually(function()
      return fleet.executions(key) == 1
    end, "the leader to start", GUARD)
    require("socket").sleep(0.3) -- the waiters subscribed on node 1
    cluster.migrate(slot_of(key), node3)
    local answers = rs.answered(ns.collect(conns, GUARD))
    print(string.format("\nRedis Cluster: a stampede whose slot moved mid-call answered in "
                        .. "%.1f s (fn 1.5 s)", require("socket").gettime() - t0))
    assert.equal(1, (fleet.executions(key)))
    assert.same({ led = 1, waited = 29 }, tally(answers, "how"))
    assert.equal(1, results_on(node3, key))
  end)
end)
