-- g:forget on a group over a lua_shared_dict, in a real nginx with four
-- workers: a forget holds for as long as the forgotten execution runs, not
-- for a fixed while. The server side is ngx_shm_app.lua.
local shm = require "shm_server"
local ns = shm.ns
local socket = require "socket"
local times, tally, distinct = shm.times, shm.tally, shm.distinct

local usable, why = shm.find()
if not usable then
  describe("forget across nginx workers", function()
    pending("a real nginx (" .. why .. ")")
  end)
  return
end

describe("forget across four nginx workers", function()
  local server, port

  setup(function()
    server, port = shm.start(4)
  end)

  teardown(function()
    if server then
      local trouble = shm.trouble(shm.stop(server))
      if #trouble > 0 then
        print("\nnginx error log:\n" .. table.concat(trouble, "\n"))
      end
    end
  end)

  it("holds while the forgotten execution runs: callers seconds later start anew", function()
    shm.eventually(function() return #server.workers() == 4 end, "four workers")
    -- a leader in one worker, waiters in the others
    local first = {}
    for i = 1, 20 do
      first[i] = ns.open(port, "/shm/forget?key=f1")
    end
    shm.eventually(function()
      return tonumber(shm.book(port, "arrived:forgetf1")) == 20
    end, "the first wave")
    socket.sleep(0.1) -- the last ones in, on their way to waiting
    assert.equal("true", ns.get(port, "/shm/do_forget?key=f1").fields.forgot)
    -- the forgotten execution still runs when later callers come, in
    -- every worker: the leader's, the waiters', the forgetter's
    socket.sleep(2.5)
    local second = ns.batch(port, times(20, "/shm/forget?key=f1&n=40"), 30)
    assert.same({ ["exec 2"] = 20 }, tally(second, "value"))
    assert.is_true(#distinct(second, "pid") >= 2, "the connections reached one worker only")
    ns.get(port, "/shm/set?key=release:forget")
    local answers = ns.collect(first, 30)
    assert.same({ ["exec 1"] = 20 }, tally(answers, "value"))
    assert.equal("2", shm.book(port, "exec:forgetf1"))
    assert.equal("false", ns.get(port, "/shm/do_forget?key=f1").fields.forgot)
    -- and the forget leaves nothing behind once both executions are over
    shm.eventually(function()
      return shm.entries(port, "") == 0
    end, "an empty dict", 15)
  end)
end)
