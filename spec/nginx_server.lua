-- A throwaway nginx for the OpenResty specs, and a small HTTP client.
--
-- start() runs Debian's nginx with the Lua module on 127.0.0.1 and a free
-- port, from a prefix directory of its own (config, logs, pid, temp
-- files), with one process (master_process off) serving ngx_app.lua with
-- the LuaJIT build of singleflight.core. stop() ends it and removes the
-- prefix. The worker also exits by itself after a while (init_worker), in
-- case the spec run dies first.
--
-- start(lifetime, opts) takes, all optional:
--   http     directives added to the http block
--   servers  more server blocks; @PORT2@, @PORT3@, ... in them become more
--            free ports (server.ports[2], ...)
--   init, init_worker   Lua code run in init_by_lua (after ngx_app is
--            loaded) and in init_worker_by_lua
--   cert     true: a self-signed certificate made with the openssl command,
--            conf/cert.pem and conf/key.pem (start returns nil, why if
--            openssl is missing)
--   workers  N: a master process and N workers (else one process, no
--            master); server.workers() lists the workers' pids. The master
--            also goes away by itself after `lifetime` seconds.
-- With SINGLEFLIGHT_NGINX_VALGRIND=1 in the environment nginx runs under
-- valgrind (logs/valgrind.*.log; server.valgrind_errors() reads them).
local socket = require "socket"

local M = {}

-- How much longer than usual answers may take (nginx under valgrind).
M.patience = os.getenv("SINGLEFLIGHT_NGINX_VALGRIND") == "1" and 10 or 1

local MODULE_DIRS = { "/usr/share/nginx/modules", "/usr/lib/nginx/modules" }

local function exists(path)
  local f = io.open(path, "rb")
  if f then
    f:close()
    return true
  end
  return false
end

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1; echo \"rc=$?\""))
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("rc=(%d+)%s*$"))
  return rc == 0, out:gsub("rc=%d+%s*$", ""), rc
end

local function quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

--- What start needs, or nil and why it can't run here.
function M.find()
  if not rawget(_G, "jit") then
    return nil, "runs once, under LuaJIT (the Lua nginx embeds)"
  end
  local nginx = os.getenv("NGINX") or "/usr/sbin/nginx"
  if not exists(nginx) then
    return nil, "nginx is not installed (" .. nginx .. ")"
  end
  local found = {}
  for _, dir in ipairs(MODULE_DIRS) do
    if exists(dir .. "/ngx_http_lua_module.so") and exists(dir .. "/ndk_http_module.so") then
      found.ndk = dir .. "/ndk_http_module.so"
      found.lua = dir .. "/ngx_http_lua_module.so"
      break
    end
  end
  if not found.lua then
    return nil, "libnginx-mod-http-lua is not installed"
  end
  if not exists("/usr/share/lua/5.1/resty/core.lua") then
    return nil, "lua-resty-core is not installed"
  end
  local ok, pwd = sh("pwd")
  local root = ok and pwd:match("[^\n]+")
  if not root or not exists(root .. "/build/jit/singleflight/core.so") then
    return nil, "build/jit/singleflight/core.so is missing (make build)"
  end
  found.nginx, found.root = nginx, root
  return found
end

--- The Lua that gives nginx's collector this run's settings (under GC
-- torture: gc_torture.lua), for init_by_lua; "" otherwise. The workers
-- are forks of the state it runs in, and keep them.
function M.gc_init()
  local mode = require("gc_torture").mode()
  return mode == "" and "" or ("require(\"gc_torture\").apply(%q)"):format(mode)
end

local function free_port()
  local s = assert(socket.bind("127.0.0.1", 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

local CONF = [[
daemon on;
@PROCESSES@
pid logs/nginx.pid;
error_log logs/error.log @LOGLEVEL@;
load_module @NDK@;
load_module @LUA@;
thread_pool singleflight_spec threads=4;

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

  init_by_lua_block {
    @GC@
    app = require "ngx_app"
    @INIT@
  }
  init_worker_by_lua_block {
    app.init_worker(@LIFETIME@)
    @GUARD@
    @INIT_WORKER@
  }

  server {
    listen 127.0.0.1:@PORT@;
    lua_check_client_abort on;

    location / {
      content_by_lua_block { app.content() }
    }
    location = /abort_leader {
      content_by_lua_block { app.content() }
      log_by_lua_block { app.finished() }
    }
    location = /phase_probe {
      header_filter_by_lua_block { app.header_filter() }
      content_by_lua_block { ngx.say("probe") }
    }
    location = /start_from_log {
      log_by_lua_block { app.log() }
      content_by_lua_block { ngx.say("logged") }
    }
    location = /gone_leader {
      content_by_lua_block { app.content() }
      log_by_lua_block { app.gone_finished() }
    }
  }
@HTTP@
@SERVERS@
}
]]

-- With workers, nginx has a master process, which would start a worker
-- again after the one-process safety exit: the first worker ends it, a
-- second earlier.
local MASTER_GUARD = [=[
    if ngx.worker.id() == 0 then
      ngx.timer.at(@SECS@, function(premature)
        if not premature then -- (premature: this worker exits, on a reload)
          os.execute("kill -QUIT " .. require("ngx.process").get_master_pid())
        end
      end)
    end]=]

local function processes(n)
  -- as root, the workers run as root too (they read the checkout and the
  -- prefix, which is private to this user)
  local _, uid = sh("id -u")
  return "master_process on;\nworker_processes " .. math.floor(n) .. ";"
         .. (tonumber(uid) == 0 and "\nuser root;" or "")
end

--- Starts nginx; returns a server { port, ports, prefix, stop, log, ... }
-- or nil, why.
function M.start(lifetime, opts)
  opts = opts or {}
  local found, why = M.find()
  if not found then
    return nil, why
  end
  if opts.cert and not sh("command -v openssl") then
    return nil, "the openssl command is not installed"
  end
  local ok, out = sh("mktemp -d /tmp/singleflight-nginx.XXXXXX")
  local prefix = ok and out:match("(/tmp/singleflight%-nginx%.[%w]+)")
  assert(prefix, "mktemp failed: " .. out)
  assert(sh("mkdir -p " .. quote(prefix) .. "/conf " .. quote(prefix) .. "/logs "
            .. quote(prefix) .. "/tmp"))
  if opts.cert then
    local made, msg = sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1"
                         .. " -nodes -days 2 -subj /CN=localhost"
                         .. " -keyout " .. quote(prefix .. "/conf/key.pem")
                         .. " -out " .. quote(prefix .. "/conf/cert.pem"))
    if not made then
      sh("rm -rf " .. quote(prefix))
      return nil, "openssl could not make a certificate: " .. msg
    end
  end
  local ports = { free_port() }
  local port = ports[1]
  local servers = (opts.servers or ""):gsub("@PORT(%d+)@", function(i)
    i = tonumber(i)
    for j = #ports + 1, i do
      ports[j] = free_port()
    end
    return tostring(ports[i])
  end)
  local lpath = table.concat({
    found.root .. "/lua/?.lua", found.root .. "/lua/?/init.lua",
    found.root .. "/spec/?.lua", "/usr/share/lua/5.1/?.lua",
    "/usr/share/lua/5.1/?/init.lua",
  }, ";")
  local conf = CONF:gsub("@([%u_]+)@", {
    LPATH = lpath,
    NDK = found.ndk, LUA = found.lua, ROOT = found.root, PORT = tostring(port),
    LIFETIME = tostring(lifetime or 120),
    LOGLEVEL = os.getenv("SINGLEFLIGHT_NGINX_LOG") or "warn",
    GC = M.gc_init(),
    INIT = opts.init or "", INIT_WORKER = opts.init_worker or "",
    HTTP = opts.http or "", SERVERS = servers,
    PROCESSES = opts.workers and processes(opts.workers)
                or "master_process off;\nworker_processes 1;",
    GUARD = opts.workers
            and (MASTER_GUARD:gsub("@SECS@", tostring(math.max(1, (lifetime or 120) - 1))))
            or "",
  })
  local f = assert(io.open(prefix .. "/conf/nginx.conf", "w"))
  f:write(conf)
  f:close()
  local server = { port = port, ports = ports, prefix = prefix }
  local valgrind = os.getenv("SINGLEFLIGHT_NGINX_VALGRIND") == "1"

  function server.log()
    local lf = io.open(prefix .. "/logs/error.log", "r")
    if not lf then
      return ""
    end
    local text = lf:read("*a")
    lf:close()
    return text
  end

  function server.pid()
    local pf = io.open(prefix .. "/logs/nginx.pid", "r")
    local pid = pf and tonumber(pf:read("*l"))
    if pf then
      pf:close()
    end
    return pid
  end

  function server.alive()
    local pid = server.pid()
    return pid ~= nil and (sh("kill -0 " .. pid))
  end

  --- The pids of nginx's worker processes (with opts.workers), sorted.
  function server.workers()
    local pid = server.pid()
    local pids = {}
    if pid then
      local _, list = sh("pgrep -P " .. pid)
      for p in list:gmatch("%d+") do
        pids[#pids + 1] = tonumber(p)
      end
    end
    table.sort(pids)
    return pids
  end

  --- Sends signal `sig` (a name: "QUIT", "TERM", ...) to nginx.
  function server.signal(sig)
    local pid = server.pid()
    return pid ~= nil and (sh("kill -" .. sig .. " " .. pid))
  end

  --- True once nginx has exited, within `secs` seconds.
  function server.exited(secs)
    local pid = server.pid()
    local deadline = socket.gettime() + (secs or 5)
    while pid and sh("kill -0 " .. pid) do
      if socket.gettime() > deadline then
        return false
      end
      socket.sleep(0.02)
    end
    return true
  end

  --- The invalid reads and writes valgrind saw, each with its stacks
  -- (nil: not under valgrind).
  function server.valgrind_errors()
    if not valgrind then
      return nil
    end
    local _, text = sh("cat " .. quote(prefix) .. "/logs/valgrind.*.log")
    local hits, block = {}, nil
    for line in text:gmatch("[^\n]*") do
      if line:find("Invalid read of size", 1, true)
         or line:find("Invalid write of size", 1, true) then
        block = { line }
        hits[#hits + 1] = block
      elseif block and line:match("^==%d+== *$") then
        block = nil
      elseif block then
        block[#block + 1] = line
      end
    end
    for i, b in ipairs(hits) do
      hits[i] = table.concat(b, "\n")
    end
    return hits
  end

  function server.stop()
    local pid = server.pid()
    if pid then
      sh("kill -TERM " .. pid)
      for _ = 1, 100 do
        if not sh("kill -0 " .. pid) then
          break
        end
        socket.sleep(0.05)
      end
      if sh("kill -0 " .. pid) then
        sh("kill -KILL " .. pid)
      end
    end
    if not os.getenv("SINGLEFLIGHT_KEEP_NGINX") then
      sh("rm -rf " .. quote(prefix))
    end
  end

  --- stop(), first printing nginx's error log if it logged errors or
  -- alerts (a spec's teardown).
  function server.stop_reporting()
    local log = server.log()
    server.stop()
    if log:find("%[error%]") or log:find("%[alert%]") then
      print("\nnginx error log:\n" .. log)
    end
  end

  local cmd = quote(found.nginx) .. " -p " .. quote(prefix .. "/")
              .. " -c conf/nginx.conf -e logs/error.log"
  if valgrind then
    cmd = "valgrind -q --trace-children=yes --num-callers=30 --log-file="
          .. quote(prefix .. "/logs/valgrind.%p.log") .. " " .. cmd
  end
  local started, msg = sh(cmd)
  if not started then
    local log = server.log()
    server.stop()
    error("nginx did not start: " .. msg .. "\n" .. log)
  end
  -- accepting connections?
  for _ = 1, valgrind and 600 or 100 do
    local c = socket.connect("127.0.0.1", port)
    if c then
      c:close()
      return server
    end
    socket.sleep(0.05)
  end
  local log = server.log()
  server.stop()
  error("nginx does not answer on port " .. port .. "\n" .. log)
end

---------------------------------------------------------------------------
-- HTTP/1.0 client

local function parse(raw)
  local head, body = raw:match("^(.-)\r\n\r\n(.*)$")
  if not head then
    return { status = 0, raw = raw, fields = {}, headers = {} }
  end
  local status = tonumber(head:match("^HTTP/%d%.%d (%d+)"))
  local headers = {}
  for k, v in head:gmatch("\r\n([^:\r\n]+):%s*([^\r\n]*)") do
    headers[k:lower()] = v
  end
  local fields = {}
  for k, v in body:gmatch("([%w_]+)=([^\n]*)") do
    fields[k] = v
  end
  return { status = status, headers = headers, body = body, fields = fields }
end

--- Opens a connection and sends a GET for path; the answer is read later
-- with M.collect (or never: close the socket to abort the request).
function M.open(port, path)
  local c = assert(socket.tcp())
  c:settimeout(5)
  assert(c:connect("127.0.0.1", port))
  assert(c:send("GET " .. path .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                .. "Connection: close\r\n\r\n"))
  c:settimeout(0)
  return c
end

--- Reads the answers on the connections `conns` until each peer closed,
-- for `secs` seconds at most. Returns the parsed answers in order; a
-- connection that did not finish gives { status = 0, timed_out = true }.
function M.collect(conns, secs)
  local deadline = socket.gettime() + (secs or 10)
  local bufs, pending, index = {}, {}, {}
  for i, c in ipairs(conns) do
    bufs[i] = {}
    pending[#pending + 1] = c
    index[c] = i
  end
  while #pending > 0 and socket.gettime() < deadline do
    local readable = socket.select(pending, nil, math.min(0.1, deadline - socket.gettime()))
    for _, c in ipairs(readable) do
      local i = index[c]
      local data, err, part = c:receive(65536)
      data = data or part
      if data and #data > 0 then
        bufs[i][#bufs[i] + 1] = data
      end
      if err == "closed" then
        c:close()
        index[c] = nil
      end
    end
    local still = {}
    for _, c in ipairs(pending) do
      if index[c] then
        still[#still + 1] = c
      end
    end
    pending = still
  end
  local out = {}
  for i = 1, #conns do
    if index[conns[i]] then
      conns[i]:close()
      out[i] = { status = 0, timed_out = true, fields = {}, headers = {} }
    else
      out[i] = parse(table.concat(bufs[i]))
    end
  end
  return out
end

--- Sends every path at once and waits for all the answers.
function M.batch(port, paths, secs)
  local conns = {}
  for i, p in ipairs(paths) do
    conns[i] = M.open(port, p)
  end
  return M.collect(conns, secs)
end

--- One request.
function M.get(port, path, secs)
  return M.batch(port, { path }, secs)[1]
end

--- n copies of path, for batch.
function M.times(n, path)
  local t = {}
  for i = 1, n do
    t[i] = path
  end
  return t
end

--- How many answers have each value of the field (missing: "(none)").
function M.tally(answers, field)
  local t = {}
  for _, a in ipairs(answers) do
    local v = a.fields[field] or "(none)"
    t[v] = (t[v] or 0) + 1
  end
  return t
end

--- Waits until pred() holds, checking every 10 ms; fails after `secs`
-- seconds (a hang guard) saying what it waited for.
function M.eventually(pred, what, secs)
  local deadline = socket.gettime() + secs
  while not pred() do
    assert(socket.gettime() < deadline, "gave up waiting for " .. what)
    socket.sleep(0.01)
  end
end

-- For specs that run an nginx of their own: a shell command's success and
-- output (stderr included), a shell word, a free port on 127.0.0.1.
M.sh, M.quote, M.free_port = sh, quote, free_port

return M
