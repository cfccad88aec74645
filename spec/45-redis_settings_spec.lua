-- The settings of the Redis tier (singleflight.redis): checked at new, on
-- every Lua, before anything needs OpenResty. The fleet itself is driven in
-- 45-redis_fleet_spec.lua and 45-redis_faults_spec.lua.
local redis_tier = require "singleflight.redis"

describe("redis settings", function()
  local bad = {
    { "not a table", "x", "table expected, got string" },
    { "an unknown field", { hots = "127.0.0.1" }, "unknown field \"hots\"" },
    { "a field that is not a name", { [1] = "x" }, "unknown field 1" },
    { "host not a string", { host = 1 }, "field 'host': string expected, got 1" },
    { "host empty", { host = "" }, "field 'host': non-empty string expected" },
    { "port a string", { port = "6379" },
      "field 'port': integer from 1 to 65535 expected, got \"6379\"" },
    { "port 0", { port = 0 }, "field 'port': integer from 1 to 65535 expected, got 0" },
    { "port too big", { port = 65536 }, "field 'port': integer from 1 to 65535" },
    { "port a fraction", { port = 6379.5 }, "field 'port': integer from 1 to 65535" },
    { "path and host", { path = "/run/redis.sock", host = "127.0.0.1" },
      "field 'path' (a unix socket) goes without 'host' and 'port'" },
    { "path and port", { path = "/run/redis.sock", port = 6379 },
      "field 'path' (a unix socket) goes without 'host' and 'port'" },
    { "path not a string", { path = true }, "field 'path': string expected, got boolean" },
    { "password not a string", { password = 123 }, "field 'password': string expected" },
    { "db negative", { db = -1 }, "field 'db': non-negative integer expected, got -1" },
    { "db a fraction", { db = 1.5 }, "field 'db': non-negative integer expected, got 1.5" },
    { "prefix a table", { prefix = {} }, "field 'prefix': string expected, got table" },
    { "lease zero", { lease = 0 }, "field 'lease': positive number of seconds expected, got 0" },
    { "lease a string", { lease = "5" }, "field 'lease': positive number of seconds expected" },
    { "lease infinite", { lease = math.huge }, "field 'lease': positive number of seconds" },
    { "lease NaN", { lease = 0 / 0 }, "field 'lease': positive number of seconds" },
    { "timeout negative", { timeout = -0.5 }, "field 'timeout': positive number of seconds" },
    { "pool_size zero", { pool_size = 0 }, "field 'pool_size': positive integer expected, got 0" },
    { "secret not a string", { secret = 42 }, "field 'secret': string expected, got 42" },
    { "secret empty", { secret = "" }, "field 'secret': non-empty string expected, got \"\"" },
    { "username not a string", { username = 1, password = "p" },
      "field 'username': string expected, got 1" },
    { "username without password", { username = "alice" },
      "field 'username' (an ACL user) goes with 'password'" },
    { "username empty", { username = "", password = "p" },
      "field 'username': non-empty string expected" },
    { "ssl not a boolean", { ssl = "yes" }, "field 'ssl': boolean expected, got \"yes\"" },
    { "ssl_verify not a boolean", { ssl = true, ssl_verify = 1 },
      "field 'ssl_verify': boolean expected, got 1" },
    { "ssl_verify without ssl", { ssl_verify = true },
      "field 'ssl_verify' goes with 'ssl = true'" },
    { "server_name without ssl", { server_name = "redis.example" },
      "field 'server_name' goes with 'ssl = true'" },
    { "server_name empty", { ssl = true, server_name = "" },
      "field 'server_name': non-empty string expected" },
    { "ssl over a unix socket", { ssl = true, path = "/run/redis.sock" },
      "field 'ssl' goes with 'host' and 'port', not 'path'" },
    { "sentinels not a list", { sentinels = "127.0.0.1:26379", master_name = "m" },
      "field 'sentinels': non-empty list of { host = string, port = integer } expected, "
      .. "got \"127.0.0.1:26379\"" },
    { "sentinels empty", { sentinels = {}, master_name = "m" },
      "field 'sentinels': non-empty list of { host = string, port = integer } expected, "
      .. "got an empty table" },
    { "sentinels with a named field", { sentinels = { { host = "a" }, x = 1 }, master_name = "m" },
      "field 'sentinels': non-empty list of { host = string, port = integer } expected, "
      .. "got key \"x\"" },
    { "a sentinel not a table", { sentinels = { "a:1" }, master_name = "m" },
      "field 'sentinels[1]': { host = string, port = integer } expected, got \"a:1\"" },
    { "a sentinel without host", { sentinels = { { host = "a" }, { port = 1 } },
                                   master_name = "m" },
      "field 'sentinels[2]': field 'host': non-empty string expected, got nil" },
    { "a sentinel's bad port", { sentinels = { { host = "a", port = 0 } }, master_name = "m" },
      "field 'sentinels[1]': field 'port': integer from 1 to 65535 expected, got 0" },
    { "a sentinel's unknown field", { sentinels = { { host = "a", prot = 1 } },
                                      master_name = "m" },
      "field 'sentinels[1]': unknown field \"prot\"" },
    { "sentinels and host", { sentinels = { { host = "a" } }, master_name = "m", host = "b" },
      "field 'sentinels' goes without 'host', 'port' and 'path' (the sentinels name the master)" },
    { "sentinels and path", { sentinels = { { host = "a" } }, master_name = "m", path = "/s" },
      "field 'sentinels' goes without 'host', 'port' and 'path'" },
    { "sentinels without master_name", { sentinels = { { host = "a" } } },
      "field 'sentinels' goes with 'master_name' (the name the sentinels monitor)" },
    { "master_name without sentinels", { master_name = "m" },
      "field 'master_name' goes with 'sentinels'" },
    { "master_name empty", { sentinels = { { host = "a" } }, master_name = "" },
      "field 'master_name': non-empty string expected" },
    { "sentinel_password without sentinels", { sentinel_password = "p" },
      "field 'sentinel_password' goes with 'sentinels'" },
    { "sentinel_username without sentinel_password",
      { sentinels = { { host = "a" } }, master_name = "m", sentinel_username = "u" },
      "field 'sentinel_username' (an ACL user of the sentinels) goes with 'sentinel_password'" },
    { "sentinel_password not a string",
      { sentinels = { { host = "a" } }, master_name = "m", sentinel_password = 1 },
      "field 'sentinel_password': string expected, got 1" },
    { "cluster not a list", { cluster = true },
      "field 'cluster': non-empty list of { host = string, port = integer } expected, "
      .. "got boolean" },
    { "a cluster node's bad host", { cluster = { { host = 7000 } } },
      "field 'cluster[1]': field 'host': non-empty string expected, got 7000" },
    { "cluster and port", { cluster = { { host = "a" } }, port = 7000 },
      "field 'cluster' goes without 'host', 'port' and 'path' (the cluster's nodes name each "
      .. "other)" },
    { "cluster and sentinels", { cluster = { { host = "a" } }, sentinels = { { host = "b" } },
                                 master_name = "m" },
      "field 'sentinels' goes without 'cluster'" },
    { "cluster and a db", { cluster = { { host = "a" } }, db = 1 },
      "field 'db' goes without 'cluster' (a cluster has database 0 only)" },
  }
  for _, row in ipairs(bad) do
    local what, settings, msg = row[1], row[2], row[3]
    it("raises for " .. what .. ", naming it", function()
      local ok, err = pcall(function()
        redis_tier.new(settings)
      end)
      assert.is_false(ok)
      assert.is_string(err)
      local head = "bad option 'redis' to 'new' ("
      assert.equal(head, (err:match("^[^\n]-:%d+: (.*)$") or err):sub(1, #head))
      assert.truthy(err:find(msg, 1, true), err)
    end)
  end

  it("blames the caller of new, or (check) the caller `level` levels up", function()
    local ok, err = pcall(function()
      redis_tier.new({ lease = "x" }) -- this line
    end)
    assert.is_false(ok)
    assert.truthy(err:find("45%-redis_settings_spec%.lua:%d+: "), err)
    local function group_new(s)
      local checked = redis_tier.check(s, "group", 2)
      return checked
    end
    local line
    ok, err = pcall(function()
      line = debug.getinfo(1, "l").currentline + 1
      group_new({ porrt = 1 })
    end)
    assert.is_false(ok)
    local want = ":" .. line .. ": bad option 'redis' to 'group' (unknown field \"porrt\")"
    assert.truthy(err:find(want, 1, true), err)
  end)

  it("check fills in the defaults", function()
    assert.same({ host = "127.0.0.1", port = 6379, db = 0, prefix = "singleflight:",
                  lease = 5, timeout = 0.5 }, redis_tier.check({}))
    assert.same({ path = "/run/redis.sock", db = 2, prefix = "app:", lease = 1, timeout = 0.1,
                  password = "pw", pool_size = 8, secret = "s" },
                redis_tier.check({ path = "/run/redis.sock", db = 2, prefix = "app:", lease = 1,
                                   timeout = 0.1, password = "pw", pool_size = 8, secret = "s" }))
    -- sentinels and cluster nodes: copies, their default ports filled in
    local sentinels = { { host = "10.0.0.1" }, { host = "10.0.0.2", port = 26380 } }
    assert.same({ sentinels = { { host = "10.0.0.1", port = 26379 },
                                { host = "10.0.0.2", port = 26380 } },
                  master_name = "mymaster", sentinel_password = "w", db = 0,
                  prefix = "singleflight:", lease = 5, timeout = 0.5 },
                redis_tier.check({ sentinels = sentinels, master_name = "mymaster",
                                   sentinel_password = "w" }))
    assert.same({ { host = "10.0.0.1" }, { host = "10.0.0.2", port = 26380 } }, sentinels)
    assert.same({ cluster = { { host = "10.0.0.3", port = 6379 } }, db = 0,
                  prefix = "singleflight:", lease = 5, timeout = 0.5 },
                redis_tier.check({ cluster = { { host = "10.0.0.3" } } }))
  end)

  it("good settings outside OpenResty: an error that says what it needs", function()
    if rawget(_G, "ngx") then
      return
    end
    local ok, err = pcall(redis_tier.new, { port = 6379 }, { shm = "singleflight" })
    assert.is_false(ok)
    assert.truthy(err:find("needs OpenResty", 1, true), err)
  end)

  it("the redis option of new: outside OpenResty an error naming the option", function()
    if rawget(_G, "ngx") then
      return
    end
    local singleflight = require "singleflight"
    for _, opts in ipairs { { redis = { port = 6379 } }, { redis = {}, shm = "x" } } do
      local ok, err = pcall(singleflight.new, opts)
      assert.is_false(ok)
      assert.matches("bad option '%a+' to 'new'", err)
    end
  end)
end)
