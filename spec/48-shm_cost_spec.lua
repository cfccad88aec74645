-- What a call of a group with shm costs its worker in the common case: it
-- leads the key for the whole instance, and no other worker waits on it.
-- Each shared-dict operation is a lock and a hash in nginx, taken by every
-- worker: such a call does no more of them than it needs (read the key's
-- generation, add the lock, close the watchers' count, let go of the
-- lock, count the call), starts no timer and encodes nothing.
local ns = require "nginx_server"

local usable, why = ns.find()

describe("shm: the cost of a call that leads, no other worker waiting", function()
  it("is five shared-dict operations, no timer, no encoding", function()
    if not usable then
      return pending("a real nginx (" .. why .. ")")
    end
    local server = assert(ns.start(60, {
      http = "  lua_shared_dict sf 1m;\n",
      init = 'cost_app = require "ngx_shm_cost_app"',
      servers = [[
  server {
    listen 127.0.0.1:@PORT2@;
    location / { content_by_lua_block { cost_app.content() } }
  }
]],
    }))
    finally(server.stop)
    local n = 20
    local a = ns.get(server.ports[2], "/leads?n=" .. n .. "&prefix=c1:", 30)
    assert.equal(200, a.status)
    local f = {}
    for k, v in pairs(a.fields) do
      f[k] = tonumber(v)
    end
    assert.same({ ops = 5 * n, timers = 0, encoded = 0,
                  -- counted all the same, for the whole instance
                  calls = n, executions = n, leads = n, inflight = 0 }, f)
  end)
end)
