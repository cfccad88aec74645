-- A throwaway redis-server and a fleet of nginx instances for the Redis
-- specs (45-redis_*).
--
-- redis(opts) runs Debian's redis-server on 127.0.0.1 and a free port, no
-- persistence, from a directory of its own; opts.password sets requirepass,
-- opts.unixsocket adds a unix socket (server.path), opts.config is a list of
-- more settings ({ "maxmemory 64mb", ... }); opts.tls adds a TLS port
-- (server.tls_port, a self-signed certificate for CN redis.test made by
-- openssl) beside the plain one; opts.sentinel = { name =, port = the
-- master's, quorum = 1, password = the master's } makes it a Redis Sentinel
-- monitoring that master (down after 1 s, failover timeout 3 s), opts.password
-- then its own requirepass.
-- It returns { port, command(...), command_in(db, ...), stop([how]), start(),
-- freeze([false]), close() }: command sends one command over a plain socket and returns the
-- reply (errors as { err = msg }); stop ends the server (SHUTDOWN NOSAVE, or
-- SIGKILL with how "kill"); start starts it again on the same port; freeze
-- stops it answering (SIGSTOP), freeze(false) thaws it; close stops it and
-- removes its directory.
--
-- fleet(n, opts) runs n nginx instances (master + opts.workers workers, 2 by
-- default, `listen ... reuseport` spreading the connections over them), each
-- serving ngx_fleet.lua with the LuaJIT build of singleflight.core, standing
-- for n machines. It returns { instances = { {port, prefix, name, log(),
-- kill(), pids()}, ... }, executions(key), stop() }. Every produce() of every
-- instance appends a line to one file: executions(key) counts the lines of
-- key. The workers also exit by themselves after a while, in case the spec
-- run dies first. both(n, redis_opts) starts a server and n instances,
-- stop_both(redis, fleet) stops them; tag(prefix, key, group, dict) is the
-- start of a key's Redis names, path(endpoint, q) a request's path.
local socket = require "socket"
local ns = require "nginx_server"

local M = {}

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1; echo \"rc=$?\""))
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("rc=(%d+)%s*$"))
  return rc == 0, (out:gsub("rc=%d+%s*$", ""))
end

local function quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then
    f:close()
    return true
  end
  return false
end

-- A live process (a zombie left to a PID 1 that does not reap is gone).
local function alive(pid)
  local f = io.open("/proc/" .. pid .. "/stat", "r")
  if not f then
    return (sh("kill -0 " .. pid))
  end
  local stat = f:read("*a") or ""
  f:close()
  local state = stat:match("^%d+ %b() (%a)")
  return state ~= nil and state ~= "Z"
end

local function any_alive(pids)
  for _, pid in ipairs(pids) do
    if alive(pid) then
      return true
    end
  end
  return false
end

function M.free_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

local function tempdir(what)
  local ok, out = sh("mktemp -d /tmp/singleflight-" .. what .. ".XXXXXX")
  local dir = ok and out:match("(/tmp/singleflight%-" .. what .. "%.[%w]+)")
  assert(dir, "mktemp failed: " .. out)
  return dir
end

--- What the specs need, or nil and why they can't run here.
function M.find()
  local found, why = ns.find()
  if not found then
    return nil, why
  end
  local server = os.getenv("REDIS_SERVER") or "/usr/bin/redis-server"
  if not exists(server) then
    return nil, "redis-server is not installed (Debian's redis-server)"
  end
  found.redis_server = server
  return found
end

--- Nil when the specs can run here, else why not: no nginx or
-- redis-server, or (`also`) no file also[1] (also[2] says what it is).
-- The spec file says it with a pending spec (busted's describe and
-- pending are the spec file's, not this module's).
function M.unusable(also)
  local found, why = M.find()
  if found and also and not exists(also[1]) then
    found, why = nil, also[2]
  end
  if found then
    return nil
  end
  return "what the specs need (" .. why .. ")"
end

---------------------------------------------------------------------------
-- RESP over luasocket

local function read_reply(c)
  local line, err = c:receive("*l")
  if not line then
    return nil, err
  end
  local kind, rest = line:sub(1, 1), line:sub(2)
  if kind == "+" then
    return rest
  elseif kind == "-" then
    return { err = rest }
  elseif kind == ":" then
    return tonumber(rest)
  elseif kind == "$" then
    local len = tonumber(rest)
    if len < 0 then
      return false
    end
    local data = c:receive(len + 2)
    return data and data:sub(1, len)
  elseif kind == "*" then
    local n = tonumber(rest)
    if n < 0 then
      return false
    end
    local t = {}
    for i = 1, n do
      t[i] = read_reply(c)
    end
    return t
  end
  return nil, "bad reply " .. line
end

local function command(port, password, db, ...)
  local c = socket.tcp()
  c:settimeout(5)
  local ok, err = c:connect("127.0.0.1", port)
  if not ok then
    return nil, err
  end
  local function send(args)
    local parts = { "*" .. #args .. "\r\n" }
    for _, a in ipairs(args) do
      a = tostring(a)
      parts[#parts + 1] = "$" .. #a .. "\r\n" .. a .. "\r\n"
    end
    assert(c:send(table.concat(parts)))
    return read_reply(c)
  end
  if password then
    send { "AUTH", password }
  end
  if db then
    send { "SELECT", db }
  end
  local res
  res, err = send { ... }
  c:close()
  return res, err
end

--- The start of the Redis names of `key` in the fleet's group (README,
-- "What Redis sees"): prefix, then in braces the dict's name, "=" and the
-- group's name (or "-" for singleflight.new) and the key, each with "%",
-- "{", "}" and "|" written %25, %7B, %7D and %7C. `dict` defaults to the
-- one of ngx_fleet's /run ("fleet_spec").
function M.tag(prefix, key, group, dict)
  local function esc(s)
    return (s:gsub("[%%{}|]", function(c) return string.format("%%%02X", c:byte()) end))
  end
  return esc(prefix) .. "{" .. esc(dict or "fleet_spec") .. "|"
         .. (group and "=" .. esc(group) or "-") .. "|" .. esc(key) .. "}"
end

--- "/endpoint?k=v&..." for the query `q` (a table), escaped, in the order
-- of the keys.
function M.path(endpoint, q)
  local parts = {}
  for k, v in pairs(q) do
    parts[#parts + 1] = k .. "=" .. tostring(v):gsub("[^%w%-_%.]", function(c)
      return string.format("%%%02X", c:byte())
    end)
  end
  table.sort(parts)
  return "/" .. endpoint .. "?" .. table.concat(parts, "&")
end

--- Opens `per` requests of `path` on each of `instances` at once (to be
-- read with nginx_server's collect).
function M.open_all(instances, per, path)
  local conns = {}
  for _ = 1, per do
    for _, inst in ipairs(instances) do
      conns[#conns + 1] = ns.open(inst.port, path)
    end
  end
  return conns
end

--- Asserts that every answer came (200) with the value `value` (default
-- "v", what ngx_fleet's fn returns); returns the answers.
function M.answered(answers, value)
  local check = require "luassert"
  for _, a in ipairs(answers) do
    check.equal(200, a.status, a.raw or a.body)
    check.equal(value or "v", a.fields.value, a.body)
  end
  return answers
end

---------------------------------------------------------------------------
-- redis-server

function M.redis(opts)
  opts = opts or {}
  local found, why = M.find()
  if not found then
    return nil, why
  end
  local dir = tempdir("redis")
  local server = { port = M.free_port(), dir = dir, password = opts.password }
  if opts.tls then
    local made, msg = sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1"
                         .. " -nodes -days 2 -subj /CN=redis.test"
                         .. " -keyout " .. quote(dir .. "/key.pem")
                         .. " -out " .. quote(dir .. "/cert.pem"))
    if not made then
      sh("rm -rf " .. quote(dir))
      return nil, "openssl could not make a certificate: " .. msg
    end
    assert(sh("chmod 0644 " .. quote(dir .. "/key.pem")))
    server.tls_port = M.free_port()
  end
  if opts.unixsocket then
    server.path = dir .. "/redis.sock"
    assert(sh("chmod 0755 " .. quote(dir)))
  end

  function server.command(...)
    return command(server.port, server.password, nil, ...)
  end

  --- A command on database `db`.
  function server.command_in(db, ...)
    return command(server.port, server.password, db, ...)
  end

  function server.pid()
    local f = io.open(dir .. "/redis.pid", "r")
    local pid = f and tonumber(f:read("*l"))
    if f then
      f:close()
    end
    return pid
  end

  local conf_file = dir .. "/sentinel.conf"
  if opts.sentinel then
    local sn = opts.sentinel
    local lines = {
      "sentinel monitor " .. sn.name .. " 127.0.0.1 " .. sn.port .. " " .. (sn.quorum or 1),
      "sentinel down-after-milliseconds " .. sn.name .. " 1000",
      "sentinel failover-timeout " .. sn.name .. " 3000",
      "sentinel parallel-syncs " .. sn.name .. " 1",
    }
    if sn.password then
      lines[#lines + 1] = "sentinel auth-pass " .. sn.name .. " " .. sn.password
    end
    local f = assert(io.open(conf_file, "w"))
    f:write(table.concat(lines, "\n"), "\n")
    f:close()
  end

  function server.start()
    local args = {
      quote(found.redis_server), opts.sentinel and quote(conf_file) .. " --sentinel" or "",
      "--bind 127.0.0.1", "--port", server.port,
      opts.sentinel and "" or "--save '' --appendonly no", "--daemonize yes",
      "--dir", quote(dir), "--pidfile", quote(dir .. "/redis.pid"),
      "--logfile", quote(dir .. "/redis.log"),
    }
    if opts.password then
      args[#args + 1] = "--requirepass " .. quote(opts.password)
    end
    if server.tls_port then
      args[#args + 1] = "--tls-port " .. server.tls_port .. " --tls-auth-clients no"
                        .. " --tls-cert-file " .. quote(dir .. "/cert.pem")
                        .. " --tls-key-file " .. quote(dir .. "/key.pem")
                        .. " --tls-ca-cert-file " .. quote(dir .. "/cert.pem")
    end
    for _, line in ipairs(opts.config or {}) do
      args[#args + 1] = "--" .. line
    end
    if opts.unixsocket then
      -- the nginx workers may run as another user
      args[#args + 1] = "--unixsocket " .. quote(server.path) .. " --unixsocketperm 777"
    end
    local ok, out = sh(table.concat(args, " "))
    assert(ok, "redis-server did not start: " .. out)
    for _ = 1, 200 do
      if server.command("PING") == "PONG" then
        return server
      end
      socket.sleep(0.025)
    end
    error("redis-server does not answer on port " .. server.port)
  end

  -- Ends the server: `how` "kill" (SIGKILL) or a clean SHUTDOWN NOSAVE.
  function server.stop(how)
    local pid = server.pid()
    if how ~= "kill" then
      server.command("SHUTDOWN", "NOSAVE")
    end
    if pid then
      if how == "kill" then
        sh("kill -KILL " .. pid)
      end
      for _ = 1, 100 do
        if not alive(pid) then
          break
        end
        socket.sleep(0.02)
      end
      if alive(pid) then
        sh("kill -KILL " .. pid)
      end
    end
    os.remove(dir .. "/redis.pid")
  end

  --- Freezes the server (SIGSTOP: it accepts connections and answers
  -- nothing), or thaws it.
  function server.freeze(on)
    local pid = assert(server.pid(), "redis-server is not running")
    assert(sh("kill -" .. (on == false and "CONT" or "STOP") .. " " .. pid))
  end

  function server.close()
    if server.pid() then
      server.freeze(false)
    end
    server.stop()
    sh("rm -rf " .. quote(dir))
  end

  return server.start()
end

---------------------------------------------------------------------------
-- A Redis Cluster

--- A cluster of n masters (3 by default) and no replicas, made with
-- redis-cli --cluster create: { nodes = { server, ... } (as redis()
-- returns, each with id = its node id), seeds = "127.0.0.1:port,...",
-- slot(name) (a key's or channel's slot), owner(slot) (the node serving
-- it), migrate(slot, to) (moves the slot and its keys to node `to`),
-- close() }, or nil, why.
function M.cluster(n)
  local found, why = M.find()
  if not found then
    return nil, why
  end
  local cli = found.redis_server:gsub("redis%-server$", "redis-cli")
  if not exists(cli) then
    return nil, "redis-cli is not installed (Debian's redis-tools)"
  end
  local c = { nodes = {} }
  local addrs = {}

  function c.close()
    for _, node in ipairs(c.nodes) do
      node.close()
    end
  end

  for i = 1, n or 3 do
    local node, err = M.redis { config = { "cluster-enabled yes", "cluster-node-timeout 2000",
                                           "cluster-config-file nodes.conf" } }
    if not node then
      c.close()
      return nil, err
    end
    c.nodes[i] = node
    node.id = node.command("CLUSTER", "MYID")
    addrs[i] = "127.0.0.1:" .. node.port
  end
  c.seeds = table.concat(addrs, ",")
  local ok, out = sh(quote(cli) .. " --cluster create " .. table.concat(addrs, " ")
                     .. " --cluster-replicas 0 --cluster-yes")
  if not ok then
    c.close()
    return nil, "redis-cli --cluster create failed: " .. out
  end
  for _ = 1, 400 do
    local all = true
    for _, node in ipairs(c.nodes) do
      local info = node.command("CLUSTER", "INFO")
      if type(info) ~= "string" or not info:find("cluster_state:ok", 1, true) then
        all = false
      end
    end
    if all then
      break
    end
    socket.sleep(0.025)
  end

  function c.slot(name)
    return c.nodes[1].command("CLUSTER", "KEYSLOT", name)
  end

  function c.owner(slot)
    for _, r in ipairs(c.nodes[1].command("CLUSTER", "SLOTS")) do
      if slot >= r[1] and slot <= r[2] then
        for _, node in ipairs(c.nodes) do
          if node.port == tonumber(r[3][2]) then
            return node
          end
        end
      end
    end
  end

  function c.migrate(slot, to)
    local from = c.owner(slot)
    assert(to.command("CLUSTER", "SETSLOT", slot, "IMPORTING", from.id) == "OK")
    assert(from.command("CLUSTER", "SETSLOT", slot, "MIGRATING", to.id) == "OK")
    local keys = from.command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
    if #keys > 0 then
      local res = from.command("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS",
                               (table.unpack or unpack)(keys))
      assert(res == "OK", "MIGRATE: " .. tostring(type(res) == "table" and res.err or res))
    end
    for _, node in ipairs { to, from } do
      assert(node.command("CLUSTER", "SETSLOT", slot, "NODE", to.id) == "OK")
    end
    for _, node in ipairs(c.nodes) do
      if node ~= to and node ~= from then
        node.command("CLUSTER", "SETSLOT", slot, "NODE", to.id)
      end
    end
  end

  return c
end

---------------------------------------------------------------------------
-- nginx instances

local CONF = [[
daemon on;
master_process on;
worker_processes @WORKERS@;
pid logs/nginx.pid;
error_log logs/error.log @LOGLEVEL@;
load_module @NDK@;
load_module @LUA@;

events {
  worker_connections 1024;
}

http {
  access_log off;
  client_body_temp_path tmp/body;
  proxy_temp_path tmp/proxy;
  fastcgi_temp_path tmp/fastcgi;
  uwsgi_temp_path tmp/uwsgi;
  scgi_temp_path tmp/scgi;
  lua_package_path "@LPATH@;;";
  lua_package_cpath "@ROOT@/build/jit/?.so;;";
  lua_shared_dict fleet_spec 1m;
  lua_shared_dict fleet_group 1m;

  init_by_lua_block {
    @GC@
    fleet_app = require "ngx_fleet"
    fleet_app.init("@NAME@", "@COUNT@")
  }
  init_worker_by_lua_block {
    fleet_app.init_worker(@LIFETIME@)
  }

  server {
    listen 127.0.0.1:@PORT@ reuseport;
    location / {
      content_by_lua_block { fleet_app.content() }
    }
  }
}
]]

local function instance(found, name, count_file, opts)
  local prefix = tempdir("fleet")
  assert(sh("mkdir -p " .. quote(prefix) .. "/conf " .. quote(prefix) .. "/logs "
            .. quote(prefix) .. "/tmp"))
  local port = M.free_port()
  local lpath = table.concat({
    found.root .. "/lua/?.lua", found.root .. "/lua/?/init.lua",
    found.root .. "/spec/?.lua", "/usr/share/lua/5.1/?.lua",
    "/usr/share/lua/5.1/?/init.lua",
  }, ";")
  local conf = CONF:gsub("@([%u_]+)@", {
    WORKERS = tostring(opts.workers or 2),
    LOGLEVEL = os.getenv("SINGLEFLIGHT_NGINX_LOG") or "warn",
    NDK = found.ndk, LUA = found.lua, LPATH = lpath, ROOT = found.root,
    NAME = name, COUNT = count_file, LIFETIME = tostring(opts.lifetime or 120),
    PORT = tostring(port), GC = ns.gc_init(),
  })
  local f = assert(io.open(prefix .. "/conf/nginx.conf", "w"))
  f:write(conf)
  f:close()
  local inst = { name = name, port = port, prefix = prefix }

  function inst.log()
    local lf = io.open(prefix .. "/logs/error.log", "r")
    if not lf then
      return ""
    end
    local text = lf:read("*a")
    lf:close()
    return text
  end

  function inst.master()
    local pf = io.open(prefix .. "/logs/nginx.pid", "r")
    local pid = pf and tonumber(pf:read("*l"))
    if pf then
      pf:close()
    end
    return pid
  end

  --- The master's pid and its workers'.
  function inst.pids()
    local master = inst.master()
    if not master then
      return {}
    end
    local pids = { master }
    local _, out = sh("awk '$4 == " .. master .. " { print $1 }' /proc/[0-9]*/stat")
    for pid in out:gmatch("%d+") do
      pids[#pids + 1] = tonumber(pid)
    end
    return pids
  end

  --- The machine goes away: SIGKILL to the master and its workers at once.
  function inst.kill()
    local pids = inst.pids()
    if #pids > 0 then
      sh("kill -KILL " .. table.concat(pids, " "))
    end
    inst.killed = true
    return pids
  end

  function inst.stop()
    local pids = inst.pids()
    if #pids > 0 then
      sh("kill -TERM " .. pids[1])
      for _ = 1, 100 do
        if not any_alive(pids) then
          break
        end
        socket.sleep(0.05)
      end
      if any_alive(pids) then
        sh("kill -KILL " .. table.concat(pids, " "))
      end
    end
    if not os.getenv("SINGLEFLIGHT_KEEP_NGINX") then
      sh("rm -rf " .. quote(prefix))
    end
  end

  local ok, msg = sh(quote(found.nginx) .. " -p " .. quote(prefix .. "/")
                     .. " -c conf/nginx.conf -e logs/error.log")
  if not ok then
    local log = inst.log()
    inst.stop()
    error("nginx did not start: " .. msg .. "\n" .. log)
  end
  for _ = 1, 100 do
    local c = socket.connect("127.0.0.1", port)
    if c then
      c:close()
      return inst
    end
    socket.sleep(0.05)
  end
  local log = inst.log()
  inst.stop()
  error("nginx does not answer on port " .. port .. "\n" .. log)
end

function M.fleet(n, opts)
  opts = opts or {}
  local found, why = M.find()
  if not found then
    return nil, why
  end
  local dir = tempdir("count")
  local count_file = dir .. "/executions"
  -- the workers may run as another user (nobody, under a root master)
  assert(sh("chmod 0777 " .. quote(dir)))
  local fleet = { instances = {}, count_file = count_file }
  for i = 1, n do
    local ok, inst = pcall(instance, found, "i" .. i, count_file, opts)
    if not ok then
      for _, prev in ipairs(fleet.instances) do
        prev.stop()
      end
      error(inst, 0)
    end
    fleet.instances[i] = inst
  end

  --- The executions of `key` so far, and the lines: "key instance pid".
  function fleet.executions(key)
    local f = io.open(count_file, "r")
    if not f then
      return 0, {}
    end
    local lines = {}
    for line in f:lines() do
      if line:match("^(%S+)") == key then
        lines[#lines + 1] = line
      end
    end
    f:close()
    return #lines, lines
  end

  function fleet.stop()
    for _, inst in ipairs(fleet.instances) do
      inst.stop()
    end
    sh("rm -rf " .. quote(dir))
  end

  return fleet
end

--- A redis-server (rs.redis(redis_opts)) and n nginx instances (fleet(n)),
-- or an error with nothing left running.
function M.both(n, redis_opts)
  local redis = assert(M.redis(redis_opts))
  local ok, fleet = pcall(M.fleet, n)
  if not ok then
    redis.close()
    error(fleet, 0)
  end
  return redis, fleet
end

--- Stops what both started (either may be nil).
function M.stop_both(redis, fleet)
  if fleet then
    fleet.stop()
  end
  if redis then
    redis.close()
  end
end

return M
