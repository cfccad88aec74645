-- g:start_detached in OpenResty, and the README's stale-while-revalidate
-- recipe built on it (spec/swr.lua over lua-resty-lrucache): a stale
-- entry is answered at once, the request is not held by the refresh, and
-- a stampede on a stale entry starts one refresh.
local ns = require "nginx_server"

local GUARD = 5 * ns.patience

local usable, why = ns.find()
local lrucache = io.open("/usr/share/lua/5.1/resty/lrucache.lua")
if lrucache then
  lrucache:close()
elseif usable then
  usable, why = false, "lua-resty-lrucache is not installed"
end

if not usable then
  describe("OpenResty, stale-while-revalidate", function()
    pending("a real nginx (" .. why .. ")")
  end)
  return
end

describe("OpenResty, stale-while-revalidate over g:start_detached", function()
  local server, port

  setup(function()
    server = assert(ns.start(60, {
      servers = [[
  server {
    listen 127.0.0.1:@PORT2@;
    location / {
      content_by_lua_block { require("ngx_swr_app").content() }
    }
  }]],
    }))
    port = server.ports[2]
  end)

  teardown(function()
    if server then
      server.stop_reporting()
    end
  end)

  local function get(path)
    local a = ns.get(port, path, GUARD)
    assert.is_nil(a.timed_out, path .. " did not answer")
    assert.equal(200, a.status)
    return a.fields
  end

  it("a miss loads once; a stale entry is answered while one detached refresh runs",
     function()
    local first = get("/get?key=a&ttl=0.2")
    assert.equal("a-v1", first.value)
    assert.equal("1", first.calls)
    require("socket").sleep(0.3) -- the entry is stale now
    get("/gate?open=0")
    -- a stampede on the stale entry: every request answers with the stale
    -- value while the one refresh is held at the origin's gate
    local paths = {}
    for i = 1, 10 do
      paths[i] = "/get?key=a&ttl=0.2"
    end
    local answers = ns.batch(port, paths, GUARD)
    for _, a in ipairs(answers) do
      assert.is_nil(a.timed_out, "a request was held by the refresh")
      assert.equal("a-v1", a.fields.value)
    end
    -- one refresh, held at the gate, for the ten stale answers
    ns.eventually(function()
      return get("/origin").running == "1"
    end, "the refresh", GUARD)
    assert.equal("2", get("/origin").calls)
    assert.equal("a-v1", get("/get?key=a&ttl=0.2").value) -- still stale, and
    assert.equal("2", get("/origin").calls) -- joined the running refresh
    get("/gate?open=1")
    ns.eventually(function()
      return get("/get?key=a&ttl=60").value == "a-v2"
    end, "the refreshed value", GUARD)
    assert.equal("2", get("/origin").calls)
    assert.equal("0", get("/origin").running)
  end)

  it("g:start holds its request until fn ends; g:start_detached does not", function()
    get("/gate?open=0")
    local held = ns.open(port, "/start?kind=start&key=c")
    local detached = get("/start?kind=start_detached&key=d")
    assert.equal("true", detached.started)
    -- both fns are at the gate; only the request of g:start waits for its
    -- light thread (ngx_lua ends a request once its light threads end)
    ns.eventually(function()
      return get("/origin").running == "2"
    end, "both fns", GUARD)
    local early = ns.collect({ held }, 0.5)[1]
    assert.is_true(early.timed_out, "g:start's request ended before its fn")
    get("/gate?open=1")
    local again = ns.get(port, "/start?kind=start&key=e", GUARD)
    assert.equal("true", again.fields.started)
    ns.eventually(function()
      return get("/origin").running == "0"
    end, "the fns' end", GUARD)
  end)
end)
