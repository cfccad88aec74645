-- Run by 32-copas_regress_spec.lua in a child process, from the top of the
-- repository: `lua spec/copas_exit.lua MODE`. It ends with a leader
-- suspended in a copas thread and a duplicate waiting for it, so that
-- closing the state finalizes the leader, whose abandonment wakes the
-- waiter through the copas backend from inside a finalizer, while the
-- state's libraries are being unloaded.
--
-- MODE "fresh": nothing was woken before; "used": a call with waiters
-- completed first, so whatever the backend keeps for waking is in use;
-- "early": the backend is loaded before the leader starts (what is
-- finalized first changes with what was created first).
-- Prints "no copas" when this Lua has none, else "pending" as it ends.
local mode = arg and arg[1] or "fresh"
local v = rawget(_G, "jit") and "jit" or _VERSION:match("^Lua (%d+%.%d+)$")
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "build/" .. v .. "/?.so;" .. package.cpath

local ok_socket, socket = pcall(require, "socket")
local ok_copas, copas = pcall(require, "copas")
if not (ok_socket and ok_copas) then
  io.write("no copas\n")
  return
end
local singleflight = require "singleflight"
if mode == "early" then
  require "singleflight.backend.copas"
end

local group = singleflight.new { backend = "copas" }
copas.running = true

-- a socket nobody writes to: a thread reading it stays suspended
local function silent()
  local s = assert(socket.udp())
  assert(s:setsockname("127.0.0.1", 0))
  s:settimeout(0)
  return s
end

local function steps(n)
  for _ = 1, n do
    copas.step(0)
  end
end

if mode == "used" then
  local done = 0
  local gate = silent()
  copas.addthread(function()
    group:call("first", function()
      copas.receive(gate, 1)
      return "first"
    end)
    done = done + 1
  end)
  for _ = 1, 3 do
    copas.addthread(function()
      assert(group:call("first", function() return "dup" end) == "first")
      done = done + 1
    end)
  end
  steps(3)
  assert(gate:sendto("o", gate:getsockname()))
  for _ = 1, 100 do
    if done == 4 then
      break
    end
    copas.step(0.01)
  end
  assert(done == 4, "the first call did not finish")
end

local shared = group:stats().shared
local held = silent()
copas.addthread(function()
  group:call("k", function()
    copas.receive(held, 1) -- never answered
  end)
end)
copas.addthread(function()
  group:call("k", function() return "duplicate" end)
end)
steps(3)
assert(group:stats().inflight == 1 and group:stats().shared == shared + 1,
       "the leader and its duplicate are not both pending")
io.write("pending\n")
io.stdout:flush()
