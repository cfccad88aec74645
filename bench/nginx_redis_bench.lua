--- The Redis tier's cost per stampede: three nginx instances with two
-- workers each and a redis-server (spec/redis_server.lua; the app is
-- spec/ngx_fleet.lua, whose /group is a g:call of a group with shm and
-- redis, the pool at its default size), all on 127.0.0.1. Two stampedes:
-- one key x 200 requests spread over the instances, and 500 keys at once
-- (each key once on each instance). For each: the executions, the most
-- connections Redis had meanwhile (INFO clients, sampled every 10 ms), the
-- connections it accepted, and the commands the instances sent (INFO
-- commandstats: the scripts, SUBSCRIBE and UNSUBSCRIBE, AUTH, SELECT,
-- CONFIG; not the commands the scripts run).
--
--   luajit bench/nginx_redis_bench.lua [scale]
--
-- Run from the repository root (bench/run.sh does it), under LuaJIT with
-- LuaSocket. Prints "<name> <value>" lines. Prints nothing (and says why
-- on stderr) where nginx, the Lua module or redis-server can't run.
package.path = "bench/?.lua;spec/?.lua;" .. package.path
local harness = require "nginx_harness"
local rs = require "redis_server"
local socket = require "socket"
local ns = harness.ns

local _, smoke = harness.scale()
local INSTANCES, WORKERS = 3, 2
local REQUESTS = smoke and 12 or 200
local KEYS = smoke and 10 or 500
local SECS = smoke and 0.3 or 1.5
local SENT = { "evalsha", "eval", "subscribe", "unsubscribe", "ssubscribe", "sunsubscribe",
               "auth", "select", "config" }

local usable, why = rs.find()
if not usable then
  io.stderr:write("bench: the Redis fleet rows skipped: ", why, "\n")
  return
end

local redis, fleet = rs.both(INSTANCES)

-- (each a connection of its own: counted, to be taken off)
local asked = 0
local function info(section)
  asked = asked + 1
  return redis.command("INFO", section)
end

local function sent()
  local text, n = info("commandstats"), 0
  for _, name in ipairs(SENT) do
    n = n + tonumber(text:match("cmdstat_" .. name .. ":calls=(%d+)") or 0)
  end
  return n
end

local function accepted()
  return tonumber(info("stats"):match("total_connections_received:(%d+)"))
end

-- Runs the requests `paths` (each a { instance, path }) at once: the
-- executions of `keys`, and what Redis saw.
local function stampede(name, paths, keys)
  socket.sleep(1.5) -- the listeners of the last stampede leave
  local before_cmds, before_conns = sent(), accepted()
  asked = 0
  local conns = {}
  for i, p in ipairs(paths) do
    conns[i] = ns.open(p[1].port, p[2])
  end
  local most, t0 = 0, socket.gettime()
  while socket.gettime() - t0 < SECS * 0.9 do
    local n = tonumber(info("clients"):match("connected_clients:(%d+)")) - 1
    most = math.max(most, n)
    socket.sleep(0.01)
  end
  -- read one after another (more sockets than select takes): they are
  -- answered at about the same time
  local ok, deadline = 0, socket.gettime() + SECS * 10 + 30
  for _, c in ipairs(conns) do
    c:settimeout(math.max(0.01, deadline - socket.gettime()))
    local data, _, part = c:receive("*a")
    c:close()
    data = data or part or ""
    if data:match("^HTTP/1%.%d 200") and data:find("\nok=true", 1, true) then
      ok = ok + 1
    end
  end
  local cmds = sent() - before_cmds
  local opened = accepted() - before_conns - asked
  local execs = 0
  for _, k in ipairs(keys) do
    execs = execs + fleet.executions(k)
  end
  print(("redis_%s_execs %d"):format(name, execs))
  print(("redis_%s_keys %d"):format(name, #keys))
  print(("redis_%s_requests %d"):format(name, #paths))
  print(("redis_%s_answered %d"):format(name, ok))
  print(("redis_%s_conns_most %d"):format(name, most))
  print(("redis_%s_conns_opened %d"):format(name, opened))
  print(("redis_%s_commands %d"):format(name, cmds))
end

local ok, err = pcall(function()
  local paths = {}
  for i = 1, REQUESTS do
    local inst = fleet.instances[(i - 1) % INSTANCES + 1]
    paths[i] = { inst, rs.path("group", { rport = redis.port, key = "one", prefix = "b1:",
                                          sleep = SECS }) }
  end
  stampede("one", paths, { "one" })
  paths = {}
  local keys = {}
  for k = 1, KEYS do
    keys[k] = "k" .. k
    for _, inst in ipairs(fleet.instances) do
      paths[#paths + 1] = { inst, rs.path("group", { rport = redis.port, key = keys[k],
                                                     prefix = "b2:", sleep = SECS }) }
    end
  end
  stampede("many", paths, keys)
  print(("redis_instances %d"):format(INSTANCES))
  print(("redis_workers %d"):format(WORKERS))
  print(("redis_secs %g"):format(SECS))
end)
rs.stop_both(redis, fleet)
assert(ok, err)
