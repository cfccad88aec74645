-- nginx edges, in a real nginx with one worker: lua_code_cache off (a Lua
-- state per request, so a duplicate of singleflight.group(name) waits on a
-- leader in another state, which must not freeze the worker's event loop);
-- the TLS phases (ssl_client_hello and ssl_session_fetch can't yield on a
-- stock nginx, ssl_certificate can); g:start in the phases with no light
-- threads (timers instead) and in those with neither (init, exit_worker).
-- The server side is ngx_app.lua (cc_*, tls*, try_start, starts).
local ns = require "nginx_server"

local GUARD = 5 * ns.patience
local function eventually(pred, what, secs)
  return ns.eventually(pred, what, secs or GUARD)
end

local function numbers(a)
  local t = {}
  for k, v in pairs(a.fields) do
    t[k] = tonumber(v)
  end
  return t
end

local usable, why = ns.find()

if not usable then
  describe("OpenResty edges", function()
    pending("a real nginx (" .. why .. ")")
  end)
  return
end

-- ports[2]: plain, g:start in every phase of a request; ports[3]:
-- lua_code_cache off; ports[4]: TLS.
local OPTS = {
  cert = true,
  init = [[app.try_start("init")]],
  init_worker = [[app.try_start("init_worker")]],
  http = [[
  lua_shared_dict sf_spec 1m;
  ssl_session_fetch_by_lua_block { app.tls_phase("fetch") }
  ssl_session_store_by_lua_block { app.tls_phase("store") }
  exit_worker_by_lua_block { app.try_start("exit_worker") }
]],
  servers = [[
  server {
    listen 127.0.0.1:@PORT2@;
    location = /phase_starts {
      set_by_lua_block $sf_unused { app.try_start("set") return "" }
      header_filter_by_lua_block { app.try_start("header_filter") }
      body_filter_by_lua_block {
        if ngx.arg[2] then app.try_start("body_filter") end
      }
      log_by_lua_block { app.try_start("log") }
      content_by_lua_block { ngx.say("phases") }
    }
  }
  server {
    listen 127.0.0.1:@PORT3@;
    lua_code_cache off;
    location = /ping { return 200 "pong\n"; }
    location / { content_by_lua_block { require("ngx_app").content() } }
  }
  server {
    listen 127.0.0.1:@PORT4@ ssl;
    ssl_certificate cert.pem;
    ssl_certificate_key key.pem;
    ssl_protocols TLSv1.2;
    ssl_session_tickets off;
    ssl_client_hello_by_lua_block { app.tls_phase("hello") }
    ssl_certificate_by_lua_block { app.tls_phase("cert") }
    location / { return 200 "tls\n"; }
  }
]],
}

describe("OpenResty edges", function()
  local server, port, cc, tls_port, starts_port

  setup(function()
    server = assert(ns.start(120, OPTS))
    port, starts_port, cc, tls_port =
      server.port, server.ports[2], server.ports[3], server.ports[4]
  end)

  teardown(function()
    if server then
      server.stop_reporting()
    end
  end)

  local function cc_stats()
    local a = ns.get(cc, "/cc_stats", GUARD)
    assert.equal(200, a.status)
    return numbers(a)
  end

  local function ping()
    local a = ns.get(cc, "/ping", GUARD)
    assert.is_nil(a.timed_out, "the worker does not answer /ping")
    return a.status
  end

  describe("lua_code_cache off", function()
    it("a duplicate in another Lua state waits through the event loop and gets the result",
       function()
      local before = cc_stats()
      local leader = ns.open(cc, "/cc_lead?key=wait")
      eventually(function() return cc_stats().inflight == before.inflight + 1 end, "the leader")
      local dup = ns.open(cc, "/cc_dup?key=wait")
      eventually(function() return cc_stats().shared == before.shared + 1 end, "the duplicate")
      -- the duplicate waits; the worker serves others meanwhile
      assert.equal(200, ping())
      assert.equal(200, ping())
      assert.equal(200, ns.get(cc, "/cc_release?key=wait", GUARD).status)
      local answers = ns.collect({ leader, dup }, GUARD)
      assert.equal("from leader wait", answers[1].fields.value)
      local d = answers[2]
      assert.is_nil(d.timed_out)
      assert.equal(200, d.status)
      assert.equal("from leader wait", d.fields.value) -- copied across states
      assert.equal("true", d.fields.shared)
      assert.equal("false", d.fields.led)
      local st = cc_stats()
      assert.equal(before.executions + 1, st.executions)
      assert.equal(before.inflight, st.inflight)
    end)

    it("with a timeout, the duplicate gives up and the worker never froze", function()
      local before = cc_stats()
      local leader = ns.open(cc, "/cc_lead?key=timeout")
      eventually(function() return cc_stats().inflight == before.inflight + 1 end, "the leader")
      local dups = {}
      for i = 1, 3 do
        dups[i] = ns.open(cc, "/cc_dup?key=timeout&timeout=0.3")
      end
      eventually(function() return cc_stats().shared == before.shared + 3 end, "the duplicates")
      assert.equal(200, ping())
      local answers = ns.collect(dups, GUARD)
      for _, a in ipairs(answers) do
        assert.is_nil(a.timed_out)
        assert.equal("singleflight: wait timed out", a.fields.err)
        assert.equal("false", a.fields.shared)
      end
      assert.equal(200, ping())
      ns.get(cc, "/cc_release?key=timeout", GUARD)
      assert.equal("from leader timeout", ns.collect({ leader }, GUARD)[1].fields.value)
      assert.equal(before.timeouts + 3, cc_stats().timeouts)
    end)

    it("a leader whose request exits inside fn: the duplicate in another state takes over",
       function()
      local before = cc_stats()
      local leader = ns.open(cc, "/cc_lead?key=exit&how=exit")
      eventually(function() return cc_stats().inflight == before.inflight + 1 end, "the leader")
      local dup = ns.open(cc, "/cc_dup?key=exit")
      local answers = ns.collect({ leader, dup }, GUARD)
      assert.equal(503, answers[1].status)
      local d = answers[2]
      assert.is_nil(d.timed_out, "the duplicate still waits")
      assert.equal("own", d.fields.value)
      assert.equal("true", d.fields.led)
      local st = cc_stats()
      assert.equal(before.abandoned + 1, st.abandoned)
      assert.equal(before.inflight, st.inflight)
    end)

    -- regression: every Lua state that made a group started an
    -- ngx.timer.every that never ended: with lua_code_cache off each
    -- request's state stayed alive for good
    it("requests leave no timer behind", function()
      local before = cc_stats().pending_timers
      for _ = 1, 20 do
        assert.equal(200, ns.get(cc, "/cc_stats", GUARD).status)
      end
      assert.is_true(cc_stats().pending_timers <= before + 1)
    end)
  end)

  describe("TLS phases", function()
    local function edge()
      return numbers(ns.get(port, "/stats?group=edge", GUARD))
    end

    -- A request that leads "tls" until /tls_release.
    local function hold()
      local before = edge()
      local leader = ns.open(port, "/tls_hold")
      eventually(function() return edge().inflight == before.inflight + 1 end, "the leader")
      return leader, before
    end

    local function tls(phase, act)
      local a = ns.get(port, "/tls?port=" .. tls_port .. "&phase=" .. phase .. "&act=" .. act,
                       GUARD)
      assert.equal(200, a.status)
      return a
    end

    it("ssl_client_hello: a duplicate gets the cannot-wait error; the handshake goes on",
       function()
      local leader = hold()
      local a = tls("hello", "dup")
      assert.equal("true", a.fields.handshake)
      assert.equal("false", a.fields.ok)
      assert.matches([[singleflight: cannot wait for key "tls": the nginx phase ]]
                     .. "'ssl_client_hello' cannot yield", a.fields.result, 1, true)
      ns.get(port, "/tls_release", GUARD)
      assert.equal("held", ns.collect({ leader }, GUARD)[1].fields.value)
    end)

    it("ssl_session_fetch: a duplicate gets the cannot-wait error; the handshake goes on",
       function()
      local leader = hold()
      local a = tls("fetch", "dup")
      assert.equal("true", a.fields.handshake)
      assert.equal("true", a.fields.ran_fetch)
      assert.equal("false", a.fields.ok)
      assert.matches([[singleflight: cannot wait for key "tls": the nginx phase ]]
                     .. "'ssl_session_fetch' cannot yield", a.fields.result, 1, true)
      ns.get(port, "/tls_release", GUARD)
      ns.collect({ leader }, GUARD)
    end)

    it("ssl_certificate can yield: a duplicate there waits for the leader", function()
      local leader, before = hold()
      local client = ns.open(port, "/tls?port=" .. tls_port .. "&phase=cert&act=dup")
      -- the handshake is parked in the duplicate's wait
      eventually(function() return edge().shared == before.shared + 1 end, "the duplicate")
      ns.get(port, "/tls_release", GUARD)
      local answers = ns.collect({ leader, client }, GUARD)
      assert.equal("held", answers[1].fields.value)
      local a = answers[2]
      assert.equal("true", a.fields.handshake)
      assert.equal("true", a.fields.ok)
      assert.equal("held", a.fields.result)
    end)

    it("a leader in ssl_client_hello runs fn", function()
      local a = tls("hello", "lead")
      assert.equal("true", a.fields.handshake)
      assert.equal("true", a.fields.ok)
      assert.equal("led in ssl_client_hello", a.fields.result)
    end)

    it("g:start in ssl_client_hello runs fn in a timer: it may yield", function()
      local a = tls("hello", "start")
      assert.equal("true", a.fields.handshake)
      assert.equal("true", a.fields.ok)
      assert.equal("ran in timer", ns.get(port, "/tls_future", GUARD).fields.value)
    end)
  end)

  describe("g:start", function()
    it("in init_by_lua: a singleflight: error saying start cannot spawn there", function()
      local a = ns.get(port, "/starts", GUARD)
      assert.equal("false", a.fields.init_ok)
      assert.equal("singleflight: start cannot spawn a light thread here: nginx runs "
                   .. "neither light threads nor timers in the 'init' phase",
                   a.fields.init_err)
      -- init_worker has timers
      assert.equal("true", a.fields.init_worker_ok)
      assert.equal("ran in timer", a.fields.init_worker_value)
    end)

    it("in set, header_filter, body_filter and log: fn runs in a timer", function()
      local a = ns.get(starts_port, "/phase_starts", GUARD)
      assert.equal(200, a.status)
      eventually(function()
        return ns.get(port, "/starts", GUARD).fields.log_ok ~= nil
      end, "the log phase")
      local s = ns.get(port, "/starts", GUARD)
      for _, phase in ipairs { "set", "header_filter", "body_filter", "log" } do
        assert.equal("true", s.fields[phase .. "_ok"], phase)
        assert.equal("ran in timer", s.fields[phase .. "_value"], phase)
      end
    end)
  end)

  -- Stops the server: last.
  it("QUIT stops the worker while a duplicate in another Lua state waits; "
     .. "g:start in exit_worker gets the singleflight: error", function()
    local leader = ns.open(cc, "/cc_lead?key=quit")
    local before = cc_stats()
    eventually(function() return cc_stats().inflight >= 1 end, "the leader")
    local dup = ns.open(cc, "/cc_dup?key=quit")
    eventually(function() return cc_stats().shared == before.shared + 1 end, "the duplicate")
    assert.is_true(server.signal("QUIT"))
    assert.is_true(server.exited(GUARD), "nginx ignores QUIT")
    leader:close()
    dup:close()
    local log = server.log()
    assert.matches("start in exit_worker: singleflight: start cannot spawn a light thread "
                   .. "here: nginx runs neither light threads nor timers in the "
                   .. "'exit_worker' phase", log, 1, true)
  end)
end)
