-- The shm specs' nginx: nginx_server.lua with N workers, the dicts and the
-- server of ngx_shm_app.lua (listening with reuseport, so that the kernel
-- spreads the connections over the workers), and the specs' helpers.
local ns = require "nginx_server"
local socket = require "socket"

local M = {}

M.find = ns.find

--- Starts nginx with `workers` workers; returns the server and the port
-- of the app.
function M.start(workers)
  local server = assert(ns.start(120, {
    workers = workers,
    http = [[
  lua_shared_dict sf 1m;
  lua_shared_dict tiny 12k;
  lua_shared_dict book 1m;
]],
    -- the worker's own safety exit would end a request in flight on a
    -- reload (its timer fires at once then); the master's guard is enough
    init = 'shm_app = require "ngx_shm_app"; app.init_worker = function() end',
    servers = [[
  server {
    listen 127.0.0.1:@PORT2@ reuseport;
    lua_check_client_abort on;
    location /shm/ { content_by_lua_block { shm_app.content() } }
    location = /log_phase {
      content_by_lua_block { ngx.say("logged") }
      log_by_lua_block { shm_app.log_phase() }
    }
  }
]],
  }))
  return server, server.ports[2]
end

--- Stops it; returns its error log (minus the alerts of killed workers).
function M.stop(server)
  local log = server.log()
  server.stop()
  return log
end

--- Errors and alerts in the log, but "worker process N exited on signal 9"
-- (the specs kill workers).
function M.trouble(log)
  local out = {}
  for line in log:gmatch("[^\n]+") do
    if (line:find("%[error%]") or line:find("%[alert%]") or line:find("%[crit%]")
        or line:find("%[emerg%]")) and not line:find("exited on signal 9", 1, true) then
      out[#out + 1] = line
    end
  end
  return out
end

--- Stops it (if it started) and prints the errors of its log (a spec's
-- teardown).
function M.stop_reporting(server)
  if server then
    local trouble = M.trouble(M.stop(server))
    if #trouble > 0 then
      print("\nnginx error log:\n" .. table.concat(trouble, "\n"))
    end
  end
end

M.times, M.tally = ns.times, ns.tally

--- The distinct values of `field`, sorted, as a list.
function M.distinct(answers, field)
  local set, list = {}, {}
  for _, a in ipairs(answers) do
    local v = a.fields[field]
    if v and not set[v] then
      set[v] = true
      list[#list + 1] = v
    end
  end
  table.sort(list)
  return list
end

-- The answer to `path`'s fields, as numbers.
local function numbers(port, path)
  local a = ns.get(port, path)
  assert(a.status == 200, path .. ": status " .. tostring(a.status))
  local st = {}
  for k, v in pairs(a.fields) do
    st[k] = tonumber(v)
  end
  return st
end

--- The stats of group `group` summed over the workers, as each published
-- them after its last call (for a group without shm: this worker's).
function M.stats(port, group)
  return numbers(port, "/shm/stats?group=" .. group)
end

--- The instance-wide stats of group `group`, as g:stats() gives them in
-- whichever worker answers (numbers; pid: that worker's).
function M.counters(port, group)
  return numbers(port, "/shm/istats?group=" .. group)
end

--- The same, asked until `workers` distinct workers answered (40 tries at
-- most): a list of answers, one per worker.
function M.counters_everywhere(port, group, workers)
  local by_pid, list = {}, {}
  for _ = 1, 40 do
    local st = M.counters(port, group)
    if not by_pid[st.pid] then
      by_pid[st.pid] = true
      list[#list + 1] = st
      if #list == workers then
        break
      end
    end
  end
  return list
end

--- after - before, field by field (but pid and inflight, which are not
-- counters)
function M.delta(after, before)
  local d = {}
  for k, v in pairs(after) do
    if k ~= "pid" and k ~= "inflight" then
      d[k] = v - (before[k] or 0)
    end
  end
  return d
end

--- A value of the app's book.
function M.book(port, key)
  return ns.get(port, "/shm/book?key=" .. key).fields.value
end

-- Steps until pred() holds, for `secs` seconds at most.
function M.eventually(pred, what, secs)
  local deadline = socket.gettime() + (secs or 5)
  while not pred() do
    assert(socket.gettime() < deadline, "gave up waiting for " .. what)
    socket.sleep(0.01)
  end
end

--- The number of entries of dict `dict` whose name starts with `prefix`.
function M.entries(port, prefix, dict)
  local a = ns.get(port, "/shm/entries?prefix=" .. prefix .. "&dict=" .. (dict or "sf"))
  return tonumber(a.fields.entries)
end

--- Starts `n` requests on the kill group's key, waits until they are all
-- in and its first leader is known, kills that leader's worker with
-- SIGKILL, and returns the answers, the leader's pid, and the seconds from
-- the kill to the start of the second execution.
function M.kill_leader(port, n, key)
  local conns = {}
  for i = 1, n do
    conns[i] = ns.open(port, "/shm/kill?key=" .. key)
  end
  local leader
  M.eventually(function()
    leader = tonumber(M.book(port, "leader:kill" .. key .. ":1"))
    return leader and tonumber(M.book(port, "arrived:kill" .. key)) == n
  end, "the requests and the leader", 10)
  socket.sleep(0.05) -- the last one in, on its way to waiting
  local killed_at = socket.gettime()
  assert(os.execute("kill -9 " .. leader))
  local answers = ns.collect(conns, 10)
  local started = tonumber(M.book(port, "started:kill" .. key .. ":2"))
  return answers, leader, started and started - killed_at
end

M.ns = ns

return M
