-- A worker with a big Lua heap, slow leaders and their waiters, and an
-- unrelated location (/ping) sampled all along. The library decides that a
-- leader went away from signals that cost a look per leader; it never
-- runs a garbage collection, which on such a heap stops the worker, and
-- every request it serves, for as long as the walk takes (seconds for a
-- few hundred megabytes). The wall-clock figures are make bench's; here
-- /ping has a generous hang guard only.
local ns = require "nginx_server"
local helpers = require "helpers"
local socket = require "socket"

local usable, why = ns.find()
if usable and helpers.gc_torture ~= "" then
  usable, why = false, "a big heap under GC torture would take minutes to build"
elseif usable and ns.patience > 1 then
  usable, why = false, "a big heap under valgrind would take minutes to build"
end

if not usable then
  describe("OpenResty, a big heap", function()
    pending("a real nginx (" .. why .. ")")
  end)
  return
end

local LEADERS, WAITERS, SECS = 20, 2, 3
local GUARD = 2 -- seconds: /ping answers in milliseconds when nothing stalls

describe("OpenResty, a big heap with slow leaders and their waiters", function()
  local server, port, heap_port

  setup(function()
    server = assert(ns.start(120, {
      servers = [[
  server {
    listen 127.0.0.1:@PORT2@;
    location / {
      content_by_lua_block { require("ngx_heap_app").content() }
    }
  }]],
    }))
    port, heap_port = server.port, server.ports[2]
  end)

  teardown(function()
    if server then
      server.stop_reporting()
    end
  end)

  it("answers every caller, keeps /ping quick and runs no collection", function()
    local grown = ns.get(heap_port, "/grow?n=3000000", 120)
    assert.equal(200, grown.status)
    assert.is_true(tonumber(grown.fields.kb) > 100 * 1024, "a heap of over 100 MB")

    local conns = {}
    for i = 1, LEADERS do
      for _ = 0, WAITERS do
        conns[#conns + 1] = ns.open(heap_port, ("/slow?key=k%d&secs=%d"):format(i, SECS))
      end
    end
    -- /ping, one request after another, for as long as the calls last
    -- and a little more (the sweep looks every half second)
    local worst, until_ = 0, socket.gettime() + SECS + 1.5
    while socket.gettime() < until_ do
      local t0 = socket.gettime()
      local a = ns.get(heap_port, "/ping", GUARD + 5)
      assert.equal("pong", a.body and a.body:match("pong"))
      worst = math.max(worst, socket.gettime() - t0)
      socket.sleep(0.01)
    end
    local answers = ns.collect(conns, 30)
    assert.equal(LEADERS * (WAITERS + 1), #answers)
    for _, a in ipairs(answers) do
      assert.is_nil(a.timed_out)
      assert.equal("v", a.fields.value)
      assert.equal("true", a.fields.shared)
    end
    assert.is_true(worst < GUARD, ("/ping took %.3f s"):format(worst))
    local gc = ns.get(port, "/library_collections", GUARD)
    assert.equal("0", gc.fields.n)
  end)
end)
