-- How the fleet reaches a Redis that guards itself: an ACL user (username
-- and password) and TLS (ssl, server_name). Three nginx instances with two
-- workers each and redis-servers, started for this file on 127.0.0.1
-- (redis_server.lua; the app is ngx_fleet.lua: /run is one
-- fleet:outcome).
local rs = require "redis_server"
local ns = require "nginx_server"

local usable, why = rs.find()
if not usable then
  describe("Redis access", function()
    pending("nginx and redis-server (" .. why .. ")")
  end)
  return
end

local GUARD = 15
local tally = ns.tally

describe("Redis access", function()
  local redis, fleet

  setup(function()
    redis, fleet = rs.both(3, { tls = true })
  end)

  teardown(function()
    rs.stop_both(redis, fleet)
  end)

  -- `per` requests of the query q on each instance at once, answered.
  local function stampede(per, q)
    local answers = ns.collect(rs.open_all(fleet.instances, per, rs.path("run", q)), GUARD)
    for _, a in ipairs(answers) do
      assert.equal(200, a.status, a.raw or a.body)
    end
    return answers
  end

  it("an ACL user: username and password", function()
    assert.equal("OK", redis.command("ACL", "SETUSER", "alice", "on", ">wonderland", "~*", "&*",
                                     "+@all"))
    local q = { rport = redis.port, username = "alice", password = "wonderland", key = "acl",
                prefix = "u:", sleep = 0.3 }
    local answers = stampede(2, q)
    assert.same({ led = 1, waited = 5 }, tally(answers, "how"))
    assert.equal(1, (fleet.executions("acl")))
    -- the password of another user: refused, each runs its own
    q.key, q.password = "acl-wrong", "looking-glass"
    answers = stampede(1, q)
    assert.same({ fallback = 3 }, tally(answers, "how"))
    assert.truthy(fleet.instances[1].log():find("(auth: WRONGPASS", 1, true))
  end)

  it("TLS: ssl and server_name", function()
    local q = { rport = redis.tls_port, ssl = 1, server_name = "redis.test", key = "tls",
                prefix = "s:", sleep = 0.3 }
    local answers = stampede(2, q)
    assert.same({ led = 1, waited = 5 }, tally(answers, "how"))
    assert.equal(1, (fleet.executions("tls")))
    -- the keys are there, in the same server
    assert.equal(1, #redis.command("KEYS", rs.tag("s:", "tls") .. ":result:*"))
    -- without ssl, the TLS port answers nothing Redis would: each runs its own
    q.key, q.ssl, q.server_name = "tls-plain", nil, nil
    answers = stampede(1, q)
    assert.same({ fallback = 3 }, tally(answers, "how"))
  end)
end)
