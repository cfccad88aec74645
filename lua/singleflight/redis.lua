--- singleflight.redis: one execution per key across a fleet of OpenResty
-- instances that share a Redis server (Redis 6 and later), the master that
-- Redis Sentinels name, or a Redis Cluster (Redis 7: sharded pub/sub).
--
-- The tier above (one caller per instance and key reaches it) calls
--
--   local fleet = require("singleflight.redis").new(settings, { shm = dict, group = name })
--   local bytes, how, shared = fleet:outcome(key, produce, { wait = secs, forgotten = fn })
--
-- The second argument of new is the group's identity, the same on every
-- instance that runs the same code: the lua_shared_dict's name and the
-- name of a group made by singleflight.group (none for singleflight.new).
-- produce() runs the call in this instance and returns its outcome encoded
-- as a string; outcome returns the bytes of the one execution across the
-- fleet, produce()'s own or another instance's, how it got them, and
-- whether they were handed across instances: "led" (produce ran here;
-- shared if another instance joined), "waited" (another instance's;
-- shared), "fallback" (Redis was unusable: produce ran here, unshared) or
-- "timeout" (no bytes: `wait` seconds passed waiting on another instance).
-- forgotten() is called (at most once) when the execution this call runs
-- or waits on is forgotten by a forget anywhere in the fleet: the tier
-- above lets its later callers start anew. Nothing Redis does fails a call.
--
-- The protocol, per call of key k, with t = P .. "{" .. D .. "|" .. G ..
-- "|" .. K .. "}": P, D and K the prefix, the dict's name and the key, G
-- "=" and the group's name or "-", each with "%", "{", "}" and "|" written
-- %25, %7B, %7D and %7C; so no two (prefix, dict, group, key) make one
-- name, and every key of one call has one hash tag (one Cluster slot):
--
--   t:lock            the token of the current execution, PX lease
--   t:lease:<token>   that execution's lease, PX lease, renewed by its
--                     leader every lease/3 while produce runs
--   t:joined          the tokens of executions other instances wait on
--   t:result:<token>  its outcome, for a few seconds after it ends
--   channel t:done:<db>   "r<token>\n<outcome>" when it ends, "h<token>\n"
--                     at each renewal, "a<token>\n" when produce raised,
--                     "f<token>\n" when it is forgotten
--
-- With a secret the outcome is a MAC (HMAC-SHA1 of channel, token and
-- bytes) and the bytes; an outcome whose MAC is wrong is refused.
--
-- A caller runs ACQUIRE: the lock is free, it leads; otherwise it
-- subscribes to the channel (through the worker's listener: one subscribed
-- connection per worker carries every channel the worker waits on), then
-- runs STEP (the result, or how long the lease has left, or the lease run
-- out: take over), then waits on the channel's messages until its
-- execution's outcome; each renewal's message moves
-- the waiter's deadline on, so only a leader gone silent for a whole lease
-- makes it STEP again (and take over if the lease has run out). The leader
-- ends with RELEASE: the result stored, published, its lease and (if still
-- current) the lock deleted, in one script, so a waiter's STEP never sees a
-- free lock before the result exists. FORGET deletes the lock and tells
-- the channel: the running execution keeps its lease and still reaches its
-- waiters, later callers start anew, and its RELEASE leaves the lock of its
-- successor alone. A leader with a forgotten() to call listens on the
-- channel too, between its renewals.

local error, pairs, setmetatable, tostring, type = error, pairs, setmetatable, tostring, type
local ipairs, pcall, require, rawget, tonumber = ipairs, pcall, require, rawget, tonumber
local ceil, floor, huge, max, min = math.ceil, math.floor, math.huge, math.max, math.min
local byte, find, format, gsub, match, ssub = string.byte, string.find, string.format,
                                              string.gsub, string.match, string.sub
local concat = table.concat
local open = io.open

local M = {}

-- Seconds a worker leaves Redis alone after a failure (calls fall back at
-- once meanwhile), and between two log lines about failures.
M.RETRY = 1
M.LOG_EVERY = 60

-- Connects beyond pool_size that wait for a connection of the pool.
local BACKLOG = 100000
-- Milliseconds a waiter adds to the lease's time left before it checks.
local MARGIN_MS = 10
-- Bytes of a MAC (HMAC-SHA1).
local MAC_LEN = 20
-- The first bytes of the messages "r..." and "a...".
local R, A = ("r"):byte(), ("a"):byte()

local DEFAULTS = { prefix = "singleflight:", lease = 5, timeout = 0.5 }

---------------------------------------------------------------------------
-- Settings

local FIELDS = {
  host = "string", path = "string", password = "string", prefix = "string", secret = "string",
  port = "port", db = "index", pool_size = "count", lease = "seconds", timeout = "seconds",
  username = "string", ssl = "boolean", ssl_verify = "boolean", server_name = "string",
  sentinels = "nodes", master_name = "string", sentinel_password = "string",
  sentinel_username = "string", cluster = "nodes",
}

-- The port of a node listed without one: a sentinel's, a cluster node's.
local NODE_PORT = { sentinels = 26379, cluster = 6379 }

local function describe(v)
  if type(v) == "string" then
    return format("%q", v)
  elseif type(v) == "number" then
    return tostring(v)
  end
  return type(v)
end

local function is_integer(v)
  return type(v) == "number" and v == floor(v) and v ~= huge and v ~= -huge
end

-- A list of nodes ({ host = string, port = integer }, ...) checked: a
-- fresh copy with the default port filled in, or nil and why.
local function nodes(k, v)
  local want = "non-empty list of { host = string, port = integer } expected, got "
  if type(v) ~= "table" or v[1] == nil then
    return nil, format("field '%s': %s%s", k, want, type(v) == "table" and "an empty table"
                                                     or describe(v))
  end
  local n = #v
  for i in pairs(v) do
    if not is_integer(i) or i < 1 or i > n then
      return nil, format("field '%s': %skey %s", k, want, describe(i))
    end
  end
  local out = {}
  for i = 1, n do
    local e, at = v[i], format("field '%s[%d]'", k, i)
    if type(e) ~= "table" then
      return nil, format("%s: { host = string, port = integer } expected, got %s", at,
                         describe(e))
    end
    for f in pairs(e) do
      if f ~= "host" and f ~= "port" then
        return nil, format("%s: unknown field %s", at, describe(f))
      end
    end
    if type(e.host) ~= "string" or e.host == "" then
      return nil, format("%s: field 'host': non-empty string expected, got %s", at,
                         describe(e.host))
    end
    local port = e.port == nil and NODE_PORT[k] or e.port
    if not (is_integer(port) and port >= 1 and port <= 65535) then
      return nil, format("%s: field 'port': integer from 1 to 65535 expected, got %s", at,
                         describe(port))
    end
    out[i] = { host = e.host, port = port }
  end
  return out
end

-- The fields that go with `sentinels` only.
local SENTINEL_ONLY = { "master_name", "sentinel_password", "sentinel_username" }

local function checked(settings, fname, level)
  local function bad(msg)
    error(format("bad option 'redis' to '%s' (%s)", fname, msg), level + 3)
  end
  if type(settings) ~= "table" then
    bad("table expected, got " .. type(settings))
  end
  local s = {}
  for k, v in pairs(settings) do
    local kind = FIELDS[k]
    if not kind then
      bad("unknown field " .. describe(k))
    end
    local ok, want
    if kind == "string" then
      ok, want = type(v) == "string", "string"
    elseif kind == "boolean" then
      ok, want = type(v) == "boolean", "boolean"
    elseif kind == "port" then
      ok, want = is_integer(v) and v >= 1 and v <= 65535, "integer from 1 to 65535"
    elseif kind == "index" then
      ok, want = is_integer(v) and v >= 0, "non-negative integer"
    elseif kind == "count" then
      ok, want = is_integer(v) and v >= 1, "positive integer"
    elseif kind == "nodes" then
      local why
      v, why = nodes(k, v)
      if not v then
        bad(why)
      end
      ok = true
    else
      ok, want = type(v) == "number" and v > 0 and v < huge, "positive number of seconds"
    end
    if not ok then
      bad(format("field '%s': %s expected, got %s", k, want, describe(v)))
    end
    s[k] = v
  end
  if s.path and (s.host or s.port) then
    bad("field 'path' (a unix socket) goes without 'host' and 'port'")
  end
  for _, k in pairs { "sentinels", "cluster" } do
    if s[k] and (s.host or s.port or s.path) then
      bad(format("field '%s' goes without 'host', 'port' and 'path' (%s)", k,
                 k == "sentinels" and "the sentinels name the master"
                 or "the cluster's nodes name each other"))
    end
  end
  if s.sentinels and s.cluster then
    bad("field 'sentinels' goes without 'cluster'")
  end
  if s.sentinels and not s.master_name then
    bad("field 'sentinels' goes with 'master_name' (the name the sentinels monitor)")
  end
  for _, k in pairs(SENTINEL_ONLY) do
    if s[k] ~= nil and not s.sentinels then
      bad(format("field '%s' goes with 'sentinels'", k))
    end
  end
  if s.sentinel_username and not s.sentinel_password then
    bad("field 'sentinel_username' (an ACL user of the sentinels) goes with 'sentinel_password'")
  end
  if s.cluster and s.db and s.db ~= 0 then
    bad("field 'db' goes without 'cluster' (a cluster has database 0 only)")
  end
  if s.username and not s.password then
    bad("field 'username' (an ACL user) goes with 'password'")
  end
  for _, k in pairs { "ssl_verify", "server_name" } do
    if s[k] ~= nil and not s.ssl then
      bad(format("field '%s' goes with 'ssl = true'", k))
    end
  end
  if s.ssl and s.path then
    bad("field 'ssl' goes with 'host' and 'port', not 'path'")
  end
  for _, k in pairs { "path", "host", "secret", "username", "server_name", "master_name",
                      "sentinel_username" } do
    if s[k] == "" then
      bad(format("field '%s': non-empty string expected, got \"\"", k))
    end
  end
  for k, v in pairs(DEFAULTS) do
    if s[k] == nil then
      s[k] = v
    end
  end
  if not (s.path or s.sentinels or s.cluster) then
    s.host, s.port = s.host or "127.0.0.1", s.port or 6379
  end
  s.db = s.db or 0
  return s
end

--- The settings checked, with the defaults filled in: raises "bad option
-- 'redis' to '<fname>' (...)" naming the field, blaming the caller `level`
-- levels up from the caller of check (default 1: check's caller).
function M.check(settings, fname, level)
  local s = checked(settings, fname or "new", level or 1)
  return s -- not a tail call: the levels count this frame
end

---------------------------------------------------------------------------
-- Scripts (each touches the keys of one call only, all given in KEYS)

local SCRIPTS = {
  -- KEYS lock, lease(me), joined; ARGV me, lease_ms
  -- -> {1}: lead | {0, token, ttl_ms}: wait on token
  -- (run twice, it answers the same: a retry is harmless)
  acquire = [[
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return {1} end
if cur then
  redis.call('SADD', KEYS[3], cur)
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
  return {0, cur, redis.call('PTTL', KEYS[1])}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return {1}
]],
  -- KEYS lock, lease(tok), result(tok), lease(me), joined; ARGV tok, me, lease_ms
  -- -> {2, outcome}: tok's outcome | {0, token, ttl_ms, current}: wait on
  --    token (current 0: it is no longer the lock's, it was forgotten)
  --    | {1}: tok's lease ran out and no other execution runs: lead
  step = [[
local r = redis.call('GET', KEYS[3])
if r then return {2, r} end
local ttl = redis.call('PTTL', KEYS[2])
local cur = redis.call('GET', KEYS[1])
if ttl ~= -2 then return {0, ARGV[1], ttl, cur == ARGV[1] and 1 or 0} end
if cur == ARGV[2] then return {1} end
if cur then
  redis.call('SADD', KEYS[5], cur)
  redis.call('PEXPIRE', KEYS[5], ARGV[3])
  return {0, cur, redis.call('PTTL', KEYS[1]), 1}
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
return {1}
]],
  -- KEYS lock, lease(me), joined; ARGV me, lease_ms, channel
  -- -> 1: renewed, and the waiters told | 0: lease lost
  renew = [[
if redis.call('PEXPIRE', KEYS[2], ARGV[2]) == 0 then return 0 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 1 then redis.call('PEXPIRE', KEYS[3], ARGV[2]) end
redis.call('PUBLISH', ARGV[3], 'h' .. ARGV[1] .. '\n')
return 1
]],
  -- KEYS lock, lease(me), result(me), joined; ARGV me, outcome, result_ms, channel
  -- -> {subscribers that got the message, 1 if another instance joined}
  release = [[
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
local n = redis.call('PUBLISH', ARGV[4], 'r' .. ARGV[1] .. '\n' .. ARGV[2])
redis.call('DEL', KEYS[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return {n, redis.call('SREM', KEYS[4], ARGV[1])}
]],
  -- KEYS lock, lease(me), joined; ARGV me, channel
  abandon = [[
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return redis.call('PUBLISH', ARGV[2], 'a' .. ARGV[1] .. '\n')
]],
  -- KEYS lock; ARGV channel -> 1: an execution was running (now forgotten) | 0
  forget = [[
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], 'f' .. cur .. '\n')
return 1
]],
}

-- The scripts for a cluster: the channel of a call is a shard channel of
-- its slot (SPUBLISH, Redis 7).
local SHARDED = {}
for name, src in pairs(SCRIPTS) do
  SHARDED[name] = (gsub(src, "'PUBLISH'", "'SPUBLISH'"))
end

-- Their SHA1s (none where nginx has no ngx.sha1_bin: EVAL then).
local SHA, SHARDED_SHA = {}, {}

local function hex(bin)
  return (gsub(bin, ".", function(c) return format("%02x", byte(c)) end))
end

---------------------------------------------------------------------------
-- The environment: ngx, a token unique across the fleet

local ngx, semaphore

local function load_env()
  if semaphore then
    return
  end
  ngx = rawget(_G, "ngx")
  if type(ngx) ~= "table" or not ngx.socket then
    error("singleflight: the 'redis' option needs OpenResty (nginx with ngx_lua)", 3)
  end
  semaphore = require "ngx.semaphore"
  for name, src in pairs(SCRIPTS) do
    SHA[name] = ngx.sha1_bin and hex(ngx.sha1_bin(src)) or false
    SHARDED_SHA[name] = ngx.sha1_bin and hex(ngx.sha1_bin(SHARDED[name])) or false
  end
end

local function clock()
  ngx.update_time()
  return ngx.now()
end

-- The phases where a call may wait on a socket (ssl_client_hello and
-- ssl_session_fetch let code yield only on OpenResty's patched nginx).
local COSOCKET_PHASES = {
  rewrite = true, server_rewrite = true, access = true, content = true, timer = true,
  ssl_cert = true,
}

-- Tokens: a random part read once per worker process, and a counter.
local token_pid, token_base, token_count = nil, nil, 0

local function random_hex()
  local f = open("/proc/sys/kernel/random/uuid", "r")
  local u = f and f:read("*l")
  if f then
    f:close()
  end
  if u and #u >= 32 then
    return (gsub(u, "-", ""))
  end
  f = open("/dev/urandom", "rb")
  local r = f and f:read(16)
  if f then
    f:close()
  end
  if r and #r == 16 then
    return hex(r)
  end
  return format("%x%s", floor(clock() * 1e6), (gsub(tostring({}), "%W", "")))
end

local function new_token()
  local pid = ngx.worker.pid()
  if pid ~= token_pid then
    token_pid, token_base, token_count = pid, random_hex() .. "-" .. format("%x", pid), 0
  end
  token_count = token_count + 1
  return token_base .. "-" .. format("%x", token_count)
end

---------------------------------------------------------------------------
-- Connections: RESP over ngx_lua's cosockets, commands over the pool

local fleet = {}
fleet.__index = fleet

-- A command in RESP: an array of bulk strings.
local function command(args)
  local parts = { "*" .. #args .. "\r\n" }
  for i = 1, #args do
    local a = tostring(args[i])
    parts[#parts + 1] = "$" .. #a .. "\r\n" .. a .. "\r\n"
  end
  return concat(parts)
end

-- One reply: a string, number or array (a nil reply: false); an error
-- reply: false, its text; the connection failed: nil, why. A timeout
-- before the reply's first byte is nil, "timeout"; inside it, the reply
-- is lost: nil, "timeout inside a reply".
local function read_reply(sock, inner)
  local line, err = sock:receive("*l")
  if not line then
    return nil, inner and err == "timeout" and "timeout inside a reply" or err
  end
  local kind, rest = byte(line), ssub(line, 2)
  if kind == 43 then -- +
    return rest
  elseif kind == 45 then -- -
    return false, rest
  elseif kind == 58 then -- :
    return tonumber(rest)
  elseif kind == 36 then -- $
    local len = tonumber(rest)
    if not len or len < 0 then
      return false
    end
    local data
    data, err = sock:receive(len + 2)
    if not data then
      return nil, err == "timeout" and "timeout inside a reply" or err
    end
    return ssub(data, 1, len)
  elseif kind == 42 then -- *
    local n = tonumber(rest)
    if not n or n < 0 then
      return false
    end
    local t = {}
    for i = 1, n do
      local v, e = read_reply(sock, true)
      if v == nil then
        return nil, e
      end
      t[i] = v -- an error inside an array (a script's) stays false
    end
    return t
  end
  return nil, "bad reply " .. format("%q", ssub(line, 1, 40))
end

-- Sends one command and reads its reply (as read_reply).
local function ask(sock, ...)
  local ok, err = sock:send(command { ... })
  if not ok then
    return nil, err
  end
  return read_reply(sock)
end

-- Servers whose eviction policy this worker asked about, by address.
local policy_asked = {}

-- Warns (once per worker and server) when the server may evict keys: every
-- key of the protocol has an expiry, so any policy but noeviction, with a
-- maxmemory, may drop a running call's lease, and another instance then
-- runs the call again. A server that refuses CONFIG is left alone.
local function ask_policy(self, sock, node)
  policy_asked[node.addr] = true
  self.counts.commands = self.counts.commands + 1
  local res = ask(sock, "CONFIG", "GET", "maxmemory*")
  if type(res) ~= "table" then
    return
  end
  local conf = {}
  for i = 1, #res - 1, 2 do
    conf[res[i]] = res[i + 1]
  end
  local policy, limit = conf["maxmemory-policy"], tonumber(conf.maxmemory)
  if policy and policy ~= "noeviction" and limit and limit > 0 then
    ngx.log(ngx.WARN, "singleflight: redis at ", node.addr, " evicts keys (maxmemory ", limit,
            ", maxmemory-policy ", policy, "): under memory pressure it may drop the lease of ",
            "a running call, which another instance then runs again; noeviction keeps them")
  end
end

-- AUTH, as `user` if given: true, or nil, why.
local function auth(self, sock, user, password)
  self.counts.commands = self.counts.commands + 1
  local ok, err
  if user then
    ok, err = ask(sock, "AUTH", user, password)
  else
    ok, err = ask(sock, "AUTH", password)
  end
  if not ok then
    return nil, "auth: " .. tostring(err)
  end
  return true
end

-- A new connection's AUTH, ROLE (behind sentinels: the server must be a
-- master) and SELECT (unless `subscriber`): true, or nil, why.
local function greet(self, sock, subscriber)
  local ok, err
  if self.password then
    ok, err = auth(self, sock, self.username, self.password)
    if not ok then
      return nil, err
    end
  end
  if self.sentinels then
    self.counts.commands = self.counts.commands + 1
    local role
    role, err = ask(sock, "ROLE")
    if type(role) ~= "table" or role[1] ~= "master" then
      return nil, "role: " .. tostring(type(role) == "table" and role[1] or err)
                  .. ", not master"
    end
  end
  if self.db ~= 0 and not subscriber then
    self.counts.commands = self.counts.commands + 1
    ok, err = ask(sock, "SELECT", self.db)
    if not ok then
      return nil, "select: " .. tostring(err)
    end
  end
  return true
end

local function keep(self, sock)
  if not sock:setkeepalive(self.idle_ms) then
    sock:close()
  end
end

-- A node: { host =, port = } or { path = }, and addr, its text.
local function node_at(host, port)
  return { host = host, port = port, addr = host .. ":" .. port }
end

-- Connects to `node` through the pool of `opts` (TLS if the settings say
-- so): the connection and whether it was used before, or nil, why.
local function dial(self, node, opts)
  local sock = ngx.socket.tcp()
  sock:settimeout(self.timeout_ms)
  local ok, err
  if node.path then
    ok, err = sock:connect("unix:" .. node.path, opts)
  else
    ok, err = sock:connect(node.host, node.port, opts)
  end
  if not ok then
    -- (the one server is named by the log line already)
    return nil, (node == self.node and "connect: " or "connect to " .. node.addr .. ": ")
                .. tostring(err)
  end
  local reused = (sock:getreusedtimes() or 0) > 0
  if self.ssl and not reused then
    ok, err = sock:sslhandshake(nil, self.server_name, self.ssl_verify)
    if not ok then
      sock:close()
      return nil, "ssl: " .. tostring(err)
    end
  end
  return sock, nil, reused
end

-- The pools of a node: for commands (at most pool_size connections open,
-- the callers beyond them queued) and for the listener.
local function pools_of(self, node)
  local p = self.pools[node.addr]
  if not p then
    local id = self.pool_id .. "@" .. node.addr
    p = { { pool = id, pool_size = self.pool_size, backlog = BACKLOG },
          { pool = id .. ":listener" } }
    self.pools[node.addr] = p
  end
  return p
end

---------------------------------------------------------------------------
-- Sentinels: the master is the one they name, asked at first use and again
-- after a failure (a master that moved refuses connections, answers
-- READONLY, or says ROLE slave)

-- The master each set of sentinels named last (this worker's), by
-- sentinels, master name and credentials.
local masters = {}

-- Asks the sentinels in turn, starting with the one that answered last,
-- where the master is: a node, or nil, why.
local function ask_sentinels(self)
  local list, why = self.sentinels, "no sentinel answered"
  local first = self.sentinel_first
  for j = 0, #list - 1 do
    local i = (first + j - 1) % #list + 1
    local sn = list[i]
    local sock, err, reused = dial(self, sn, sn.opts)
    local res
    if sock and self.sentinel_password and not reused then
      res, err = auth(self, sock, self.sentinel_username, self.sentinel_password)
      if not res then
        sock:close()
        sock = nil
      end
    end
    if sock then
      self.counts.commands = self.counts.commands + 1
      res, err = ask(sock, "SENTINEL", "get-master-addr-by-name", self.master_name)
      if res == nil then
        sock:close()
      else
        keep(self, sock)
      end
    end
    if type(res) == "table" and type(res[1]) == "string" and tonumber(res[2]) then
      self.sentinel_first = i
      return node_at(res[1], tonumber(res[2]))
    end
    why = "sentinel " .. sn.addr .. ": " .. (res == false and not err
      and format("knows no master %q", self.master_name) or tostring(err))
  end
  return nil, why
end

local function master_of(self)
  local m = masters[self.sentinel_id]
  if m then
    return m
  end
  local err
  m, err = ask_sentinels(self)
  if m then
    masters[self.sentinel_id] = m
  end
  return m, err
end

-- The sentinels are asked again at the next connection (if `m` is still
-- the master known, or whatever it is without `m`).
local function forget_master(self, m)
  if self.sentinels and (m == nil or masters[self.sentinel_id] == m) then
    masters[self.sentinel_id] = nil
  end
end

---------------------------------------------------------------------------
-- Cluster: the slot map, read with CLUSTER SLOTS at first use and again
-- after a MOVED reply or a node that could not be reached

local SLOTS = 16384
-- Redirections one command follows.
local MAX_REDIRECTS = 5
-- Seconds between two reads of the map that failed.
local MAP_RETRY = 0.2

-- This worker's slot maps, by seed nodes and credentials: { slots = { [slot]
-- = node } or nil, nodes = { [addr] = node }, stale, busy, retry_at }.
local maps = {}

local band, bxor, lshift, rshift
local crc_table

-- CRC16 (XMODEM), Redis Cluster's key hash.
local function crc16(s)
  if not crc_table then
    local bit = require "bit"
    band, bxor, lshift, rshift = bit.band, bit.bxor, bit.lshift, bit.rshift
    crc_table = {}
    for i = 0, 255 do
      local c = lshift(i, 8)
      for _ = 1, 8 do
        c = band(band(c, 0x8000) ~= 0 and bxor(lshift(c, 1), 0x1021) or lshift(c, 1), 0xffff)
      end
      crc_table[i] = c
    end
  end
  local crc = 0
  for i = 1, #s do
    crc = band(bxor(lshift(crc, 8), crc_table[bxor(rshift(crc, 8), byte(s, i))]), 0xffff)
  end
  return crc
end

-- The slot of a key or shard channel: its hash tag's, if it has one.
local function slot_of(key)
  local a = find(key, "{", 1, true)
  local b = a and find(key, "}", a + 1, true)
  if b and b > a + 1 then
    key = ssub(key, a + 1, b - 1)
  end
  return crc16(key) % SLOTS
end

-- The node of an address as the map knows it.
local function map_node(map, host, port)
  local addr = host .. ":" .. port
  local n = map.nodes[addr]
  if not n then
    n = node_at(host, port)
    map.nodes[addr] = n
  end
  return n
end

local connect

-- The map from CLUSTER SLOTS of `node`, or nil, why.
local function slots_of(self, map, node)
  local sock, err = connect(self, false, node)
  if not sock then
    return nil, err
  end
  self.counts.commands = self.counts.commands + 1
  local res
  res, err = ask(sock, "CLUSTER", "SLOTS")
  if res == nil then
    sock:close()
  else
    keep(self, sock)
  end
  if type(res) ~= "table" or #res == 0 then
    return nil, "cluster slots: " .. tostring(err or "no slot served")
  end
  local slots = {}
  for _, r in ipairs(res) do
    local lo, hi, m = tonumber(r[1]), tonumber(r[2]), r[3]
    if lo and hi and type(m) == "table" and tonumber(m[2]) then
      local host = m[1]
      if type(host) ~= "string" or host == "" or host == "?" then
        host = node.host -- the node asked
      end
      local n = map_node(map, host, tonumber(m[2]))
      for slot = lo, min(hi, SLOTS - 1) do
        slots[slot] = n
      end
    end
  end
  return slots
end

-- Reads the map from the first node that gives it: the nodes known, then
-- the seeds. True, or nil, why.
local function refresh(self, map)
  local tried, why = {}, "no node answered"
  local todo = {}
  for _, n in pairs(map.nodes) do
    todo[#todo + 1] = n
  end
  for _, n in ipairs(self.cluster) do
    todo[#todo + 1] = n
  end
  for _, n in ipairs(todo) do
    if not tried[n.addr] then
      tried[n.addr] = true
      local slots, err = slots_of(self, map, n)
      if slots then
        map.slots, map.stale = slots, false
        return true
      end
      why = err
    end
  end
  return nil, why
end

-- The node that serves `key`'s slot, or nil, why.
local function node_for(self, key)
  local map = self.map
  if (map.stale or not map.slots) and clock() >= map.retry_at then
    if not map.busy then
      map.busy = true
      local ok, err = refresh(self, map)
      map.busy = false
      if not ok then
        map.retry_at = clock() + MAP_RETRY
        if not map.slots then
          return nil, err
        end
      end
    else -- another call of the worker reads it: wait for it
      local by = clock() + 2 * self.timeout_ms / 1000
      while map.busy and not map.slots and clock() < by do
        ngx.sleep(0.005)
      end
    end
  end
  local slot = slot_of(key)
  local n = map.slots and map.slots[slot]
  if not n then
    return nil, "cluster: no node serves slot " .. slot
  end
  return n
end

-- A redirection's kind ("MOVED" or "ASK"), slot and node, from an error
-- reply; or nil.
local function redirection(self, reply)
  local kind, slot, host, port = match(reply or "", "^(%u+) (%d+) (%S*):(%d+)$")
  if kind ~= "MOVED" and kind ~= "ASK" then
    return nil
  end
  return kind, tonumber(slot), map_node(self.map, host, tonumber(port))
end

---------------------------------------------------------------------------
-- Commands

-- A connection ready for commands (from the pool: at most pool_size of the
-- worker's are open at a time per server, a caller beyond them waits its
-- turn) or, `subscriber`, a new one for the listener; and whether it was
-- used before; or nil, why. To `node` (a cluster's), or to the server:
-- behind sentinels, the master they name (asked again once if it cannot be
-- reached or is no master).
function connect(self, subscriber, node)
  for attempt = 1, 2 do
    local n, err = node
    if not n then
      if self.sentinels then
        n, err = master_of(self)
        if not n then
          return nil, err
        end
      else
        n = self.node
      end
    end
    local pools = pools_of(self, n)
    local sock, reused
    sock, err, reused = dial(self, n, subscriber and pools[2] or pools[1])
    if sock and not reused then
      local ok
      ok, err = greet(self, sock, subscriber)
      if not ok then
        sock:close()
        sock = nil
      elseif not subscriber and not policy_asked[n.addr] then
        ask_policy(self, sock, n)
      end
    end
    if sock then
      return sock, nil, reused
    end
    if node or not self.sentinels or attempt == 2 then
      return nil, err
    end
    forget_master(self, n)
  end
end

-- Runs a script; the reply or nil, why (the connection then closed if it
-- failed), whether the connection failed (rather than Redis answering an
-- error), and Redis's error.
local function run(self, sock, name, nkeys, ...)
  self.counts.commands = self.counts.commands + 1
  local res, err
  local sha, src = self.shas[name], self.scripts[name]
  if sha then
    res, err = ask(sock, "EVALSHA", sha, nkeys, ...)
    if res == false and err and find(err, "NOSCRIPT", 1, true) then
      self.counts.commands = self.counts.commands + 1
      res, err = ask(sock, "EVAL", src, nkeys, ...)
    end
  else
    res, err = ask(sock, "EVAL", src, nkeys, ...)
  end
  if not res then
    if res == nil then
      sock:close()
    else
      keep(self, sock)
    end
    return nil, name .. ": " .. tostring(err), res == nil, err
  end
  return res
end

-- Runs a script on a connection of its own from the pool (in a cluster,
-- the pool of the node that serves its first key, following MOVED and ASK
-- replies): the reply, or nil, why, and true if the script may have run
-- all the same (it was sent). A pooled connection that the server closed
-- meanwhile (Redis restarted) gets one retry on a new one: the scripts may
-- run twice.
local function call(self, name, nkeys, ...)
  local node, asking, redirects, retried = nil, false, 0, false
  if self.cluster then
    local why
    node, why = node_for(self, (...))
    if not node then
      return nil, why, false
    end
  end
  while true do
    local sock, err, reused = connect(self, false, node)
    local res, broken, reply
    if not sock then
      if self.cluster then
        self.map.stale = true
      end
      return nil, err, redirects > 0 or retried
    end
    if asking then
      self.counts.commands = self.counts.commands + 1
      res, err = ask(sock, "ASKING")
      if not res then
        sock:close()
        return nil, "asking: " .. tostring(err), true
      end
    end
    res, err, broken, reply = run(self, sock, name, nkeys, ...)
    if res then
      keep(self, sock)
      return res
    end
    local kind, slot, target
    if self.cluster and not broken then
      kind, slot, target = redirection(self, reply)
    end
    if kind and redirects < MAX_REDIRECTS then
      redirects, node, asking = redirects + 1, target, kind == "ASK"
      if kind == "MOVED" then
        self.map.slots[slot], self.map.stale = target, true
      end
    elseif retried or not (reused and broken) or find(err, "timeout", 1, true) then
      return nil, err, true
    else
      retried = true
    end
  end
end

---------------------------------------------------------------------------
-- The listener: each worker hears every channel it waits on through one
-- subscribed connection per server
--
-- A caller joins a channel (join) and reads its events (next_event): the
-- messages of the channel, in order, READY once the channel is subscribed
-- (w.ready; only then may the caller look at Redis, so that no message
-- after its look is missed), RESET when the connection broke and a new one
-- is subscribing (w.ready false again: the caller looks again once READY),
-- and { down = why } when no connection could be had (the caller falls
-- back). It leaves (leave) when done. The listener is a timer of its own,
-- started by the first join and ended when no channel has been wanted for
-- LINGER seconds: a light thread reads the connection and hands each
-- message to the channel's callers (an ngx.semaphore each); the timer's own
-- thread sends SUBSCRIBE and UNSUBSCRIBE as channels are wanted and no
-- longer wanted. A caller that went away without leaving (its request
-- killed) is dropped once it is past its `due` time.
--
-- In a cluster, a channel is a shard channel of its call's slot
-- (SSUBSCRIBE): each worker has a listener per node that serves channels
-- it waits on, and sends one SSUBSCRIBE per channel (a command's channels
-- must share a slot). A channel whose SSUBSCRIBE is redirected, or that
-- the node drops (Redis 7 ends the shard channels of a slot it gives
-- away), gets MOVED: its callers join it again on the node the slot map
-- names now (move).

-- Seconds the listener stays on with no channel wanted; seconds between
-- two sweeps for callers gone without leaving; channels per SUBSCRIBE.
local LINGER = 1
local SWEEP = 5
local BATCH = 200
-- Seconds the listener reads at a time (a read that times out is logged
-- by ngx_lua: it should seldom happen).
local HEAR_FOR = 600
-- A subscription not confirmed within this many `timeout`s fails.
local SUBSCRIBE_TIMEOUTS = 3

local READY, RESET, STOP, MOVED = { "ready" }, { "reset" }, { "stop" }, { "moved" }

-- The listeners of this worker, by server and credentials (and node).
local hubs = {}

local function post(w, ev)
  local t = w.tail + 1
  w.q[t], w.tail = ev, t
  w.sema:post(1)
end

-- The caller's next event, or nil after `secs` seconds without one.
local function next_event(w, secs)
  if w.head <= w.tail then
    w.sema:wait(0) -- one count per event: there is one
  elseif secs <= 0 or not w.sema:wait(secs) then
    return nil
  end
  local h = w.head
  local ev = w.q[h]
  w.q[h], w.head = nil, h + 1
  return ev
end

local function poke(hub)
  if not hub.poked then
    hub.poked = true
    hub.wake:post(1)
  end
end

local function dirty(hub, channel)
  hub.dirty[channel] = true
  poke(hub)
end

-- Every caller of every channel gets `ev`; with `drop`, the channels are
-- forgotten too (a listener that failed).
local function tell_all(hub, ev, drop)
  for channel, e in pairs(hub.channels) do
    for w in pairs(e.waiters) do
      if ev == RESET then
        w.ready = false
      end
      post(w, ev)
    end
    if drop then
      e.waiters, e.n = {}, 0
      hub.channels[channel] = nil
    else
      e.state = "off"
    end
  end
  if drop then
    hub.nchan, hub.dirty = 0, {}
  end
end

-- Drops `channel` from the hub; its callers get `ev`.
local function drop_channel(hub, channel, ev)
  local e = hub.channels[channel]
  if not e then
    return
  end
  hub.channels[channel], hub.nchan, hub.dirty[channel] = nil, hub.nchan - 1, nil
  for w in pairs(e.waiters) do
    w.ready = false
    post(w, ev)
  end
  e.waiters, e.n = {}, 0
end

-- Takes the command a reply answers off the listener's list (a cluster's):
-- its channel, if it is `channel` (any, without one); or nil.
local function settle(hub, channel)
  local p = hub.pending
  local ch = p and p[p.head]
  if ch ~= nil and (channel == nil or ch == channel) then
    p[p.head], p.head = nil, p.head + 1
    return ch
  end
  return nil
end

-- An error reply to a cluster's SSUBSCRIBE: true if it was one (handled).
local function on_error(hub, err)
  local channel = settle(hub)
  if not channel then
    return false
  end
  local conf = hub.conf
  conf.map.stale = true
  local kind, slot, target = redirection(conf, err)
  if kind == "MOVED" and conf.map.slots then
    conf.map.slots[slot] = target
  end
  drop_channel(hub, channel, kind and MOVED or { down = "subscribe: " .. err })
  return true
end

local function on_reply(hub, st, res)
  local kind, channel = res[1], res[2]
  local e = hub.channels[channel]
  if hub.pending and (kind == "ssubscribe" or (kind == "sunsubscribe" and e
                                               and e.state == "leaving")) then
    settle(hub, channel)
  end
  if kind == "message" or kind == "smessage" then
    if e then
      local m = res[3]
      for w in pairs(e.waiters) do
        post(w, m)
      end
    end
  elseif kind == "subscribe" or kind == "ssubscribe" then
    st.healthy = true
    if e then
      e.state = "on"
      for w in pairs(e.waiters) do
        if not w.ready then
          w.ready = true
          post(w, READY)
        end
      end
      if e.n == 0 then
        dirty(hub, channel)
      end
    end
  elseif kind == "unsubscribe" or kind == "sunsubscribe" then
    if e and e.state == "on" and hub.pending then -- the node gave the slot away
      hub.conf.map.stale = true
      drop_channel(hub, channel, MOVED)
    elseif e then
      e.state = "off"
      dirty(hub, channel)
    end
  end
end

-- The reader: until the connection fails (st.err).
local function read_loop(hub, sock, st)
  while true do
    local res, err = read_reply(sock)
    if type(res) == "table" then
      on_reply(hub, st, res)
    elseif res == false and err and not (hub.pending and on_error(hub, err)) then
      st.err = "subscription: " .. err
      break
    elseif res == nil and err ~= "timeout" then
      st.err = "subscription: " .. tostring(err)
      break
    end
  end
  poke(hub)
end

-- Drops the callers past their due time; true if a subscription is still
-- unconfirmed `stuck` seconds after it was asked for.
local function sweep(hub, now, stuck)
  local late = false
  for _, e in pairs(hub.channels) do
    for w in pairs(e.waiters) do
      if w.due < now then
        e.waiters[w], e.n = nil, e.n - 1
        if e.n == 0 then
          dirty(hub, w.channel)
        end
      end
    end
    if (e.state == "subscribing" or e.state == "leaving") and now - e.since > stuck then
      late = true
    end
  end
  return late
end

-- Sends SUBSCRIBE and UNSUBSCRIBE as the channels want: true, or nil, why.
local function update(hub, sock, now)
  local subs, unsubs = {}, {}
  for channel in pairs(hub.dirty) do
    local e = hub.channels[channel]
    if e and e.n > 0 and e.state == "off" then
      subs[#subs + 1], e.state, e.since = channel, "subscribing", now
    elseif e and e.n == 0 and e.state == "on" then
      unsubs[#unsubs + 1], e.state, e.since = channel, "leaving", now
    elseif e and e.n == 0 and e.state == "off" then
      hub.channels[channel], hub.nchan = nil, hub.nchan - 1
    end
  end
  hub.dirty = {}
  local conf, p = hub.conf, hub.pending
  local batch = p and 1 or BATCH
  for verb, list in pairs { [conf.sub_verb] = subs, [conf.unsub_verb] = unsubs } do
    for i = 1, #list, batch do
      local args = { verb }
      for j = i, min(i + batch - 1, #list) do
        args[#args + 1] = list[j]
      end
      if p then
        p[p.tail + 1], p.tail = list[i], p.tail + 1
      end
      conf.counts.commands = conf.counts.commands + 1
      local ok, err = sock:send(command(args))
      if not ok then
        return nil, "subscription: " .. tostring(err)
      end
    end
  end
  return true
end

-- One connection's life: "idle" (no channel wanted for LINGER seconds),
-- or nil, why, and whether a subscription was confirmed on it.
local function session(hub, sock)
  local conf, st = hub.conf, {}
  for channel, e in pairs(hub.channels) do
    e.state = "off"
    hub.dirty[channel] = true
  end
  if hub.node then
    hub.pending = { head = 1, tail = 0 }
  end
  sock:settimeouts(conf.timeout_ms, conf.timeout_ms, HEAR_FOR * 1000)
  local reader = ngx.thread.spawn(read_loop, hub, sock, st)
  local stuck = SUBSCRIBE_TIMEOUTS * conf.timeout_ms / 1000
  local next_sweep, idle = clock() + SWEEP, false
  while not st.err do
    local ok, err = update(hub, sock, clock())
    if not ok then
      st.err = err
      break
    end
    hub.poked = false
    local lonely = hub.nchan == 0
    if lonely and ngx.worker.exiting() then
      idle = true
      break
    end
    local posted = hub.wake:wait(lonely and LINGER or min(SWEEP, stuck))
    local now = clock()
    if not posted and lonely and hub.nchan == 0 then
      idle = true
      break
    elseif now >= next_sweep or not posted then
      next_sweep = now + SWEEP
      if sweep(hub, now, stuck) then
        st.err = "subscription: timeout"
      end
    end
  end
  ngx.thread.kill(reader)
  sock:close()
  if idle then
    return "idle"
  end
  return nil, st.err, st.healthy
end

-- The listener's timer: reconnects after a connection that worked broke;
-- a connection that cannot be had (or never confirmed a subscription)
-- fails every caller.
local function listener(premature, hub)
  while hub.nchan > 0 do
    local sock, err
    if premature then
      err = "nginx is exiting"
    else
      sock, err = connect(hub.conf, true, hub.node)
    end
    if not sock then
      tell_all(hub, { down = err }, true)
      break
    end
    local idle, healthy
    idle, err, healthy = session(hub, sock)
    if idle then
      break
    elseif not healthy then
      tell_all(hub, { down = err }, true)
      break
    end
    tell_all(hub, RESET, false)
  end
  hub.running = false
end

-- Adds the caller `w` to the listener of its channel (in a cluster, the
-- listener of the node that serves the channel's slot): w, or nil, why.
local function attach(self, w)
  local node, err
  if self.cluster then
    node, err = node_for(self, w.channel)
    if not node then
      return nil, err
    end
  end
  local id = node and self.hub_id .. "@" .. node.addr or self.hub_id
  local hub = hubs[id]
  if not hub then
    hub = { conf = self, node = node, channels = {}, nchan = 0, dirty = {},
            wake = semaphore.new(), poked = false, running = false }
    hubs[id] = hub
  end
  if not hub.running then
    local ok
    ok, err = ngx.timer.at(0, listener, hub)
    if not ok then
      return nil, "listener: " .. tostring(err)
    end
    hub.running = true
  end
  local channel = w.channel
  local e = hub.channels[channel]
  if not e then
    e = { waiters = {}, n = 0, state = "off", since = 0 }
    hub.channels[channel], hub.nchan = e, hub.nchan + 1
  end
  w.hub, w.entry, w.ready = hub, e, e.state == "on"
  e.waiters[w], e.n = true, e.n + 1
  if not w.ready then
    dirty(hub, channel)
  end
  return w
end

-- Joins `channel`: a caller's handle for next_event, or nil, why.
local function join(self, channel)
  return attach(self, { sema = semaphore.new(), q = {}, head = 1, tail = 0, channel = channel,
                        due = huge, moves = 0 })
end

local function detach(w)
  local e = w.entry
  if e.waiters[w] then
    e.waiters[w], e.n = nil, e.n - 1
    if e.n == 0 then
      dirty(w.hub, w.channel)
    end
  end
end

local function leave(w)
  if w.counts then -- a waiter no longer
    w.counts.waiting, w.counts = w.counts.waiting - 1, nil
  end
  detach(w)
end

-- After MOVED: w joins its channel again where the slot map says now (its
-- events so far kept): true, or nil, why.
local function move(self, w)
  detach(w)
  w.moves = w.moves + 1
  if w.moves > MAX_REDIRECTS then
    return nil, "subscribe: moved " .. w.moves .. " times"
  end
  local ok, err = attach(self, w)
  return ok and true, err
end

-- Waits until w's channel is subscribed: true, or nil, why ("timeout":
-- the caller's `deadline` came first).
local function ready(self, w, deadline)
  local by = clock() + SUBSCRIBE_TIMEOUTS * self.timeout_ms / 1000
  while not w.ready do
    local now = clock()
    if deadline and now >= deadline then
      return nil, "timeout"
    elseif now >= by then
      return nil, "subscribe: timeout"
    end
    local limit = deadline and deadline < by and deadline or by
    w.due = limit + SWEEP
    local ev = next_event(w, limit - now)
    if type(ev) == "table" and ev.down then
      return nil, ev.down
    elseif ev == MOVED then
      local ok, err = move(self, w)
      if not ok then
        return nil, err
      end
    end
  end
  return true
end

---------------------------------------------------------------------------
-- Names: every part escaped, so that none can reach into another

local function escape(c)
  return format("%%%02X", byte(c))
end

local function escaped(s)
  return (gsub(s, "[%%{}|]", escape))
end

local function names_of(self, key)
  local tag = self.head .. escaped(key) .. "}"
  return { tag = tag, lock = tag .. ":lock", joined = tag .. ":joined",
           channel = tag .. ":done:" .. self.db }
end

local function lease_of(n, token)
  return n.tag .. ":lease:" .. token
end

local function result_of(n, token)
  return n.tag .. ":result:" .. token
end

---------------------------------------------------------------------------
-- Outcomes sealed with the secret (as they are without one)

local function mac(self, n, token, bytes)
  return ngx.hmac_sha1(self.secret, n.channel .. "\n" .. token .. "\n" .. bytes)
end

local function seal(self, n, token, bytes)
  if not self.secret then
    return bytes
  end
  return mac(self, n, token, bytes) .. bytes
end

-- The bytes of a sealed outcome, or nil if its MAC is wrong.
local function unseal(self, n, token, sealed)
  if not self.secret then
    return sealed
  end
  local bytes = ssub(sealed, MAC_LEN + 1)
  if #sealed >= MAC_LEN and ssub(sealed, 1, MAC_LEN) == mac(self, n, token, bytes) then
    return bytes
  end
  return nil
end

-- An outcome refused: counted, logged at most once a LOG_EVERY.
local function refused(self)
  self.counts.refused = self.counts.refused + 1
  local now = clock()
  if now >= self.next_refused_log then
    self.next_refused_log = now + M.LOG_EVERY
    ngx.log(ngx.WARN, "singleflight: redis at ", self.where, ": an outcome failed to ",
            "authenticate (forged, altered, or sealed with another secret) and was refused (",
            self.counts.refused, " so far in this worker)")
  end
end

---------------------------------------------------------------------------
-- Failures: counted, logged at most once a LOG_EVERY, and a short pause

local function note(self, err)
  forget_master(self) -- behind sentinels: it may have moved
  local c = self.counts
  c.errors = c.errors + 1
  local now = clock()
  self.down_until = now + M.RETRY
  self.unlogged = self.unlogged + 1
  if now >= self.next_log then
    ngx.log(ngx.ERR, "singleflight: redis at ", self.where, " failed (", err, "): calls run ",
            "in this instance, unshared with the fleet, until it answers (", self.unlogged,
            " failure(s) since the last report)")
    self.next_log, self.unlogged = now + M.LOG_EVERY, 0
  end
end

-- A script that may take the lock for token `me` failed after it was sent
-- (a timeout, the connection lost): Redis may run it later all the same (a
-- frozen server thawing), leaving a lock nobody renews or releases, and the
-- next callers of the key waiting for its lease to run out. Such tokens are
-- abandoned by a timer of the worker, which tries at once and again (every
-- FIRST_PAUSE, doubling up to RETRY) until Redis answers: sent after the
-- script that timed out, the abandon runs after it (Redis serves what was
-- sent in order). Once it answered, one more try follows, in case the
-- answered one overtook the script.
local MAX_ORPHANS = 100
local FIRST_PAUSE = 0.05

local abandon_orphans

local function orphan(self, n, me)
  local o = self.orphans
  if #o < MAX_ORPHANS then
    o[#o + 1] = { n.lock, lease_of(n, me), n.joined, me, n.channel, tries = 0 }
  end
  if not self.cleaning then
    self.cleaning = ngx.timer.at(0, abandon_orphans, self) and true or false
  end
end

function abandon_orphans(premature, self)
  local o, pause = self.orphans, FIRST_PAUSE
  while not premature and #o > 0 and not ngx.worker.exiting() do
    local t = o[#o]
    local res, err = call(self, "abandon", 3, t[1], t[2], t[3], t[4], t[5])
    if res then
      t.tries = t.tries + 1
      if t.tries >= 2 then
        o[#o] = nil
      end
    else
      note(self, err)
      ngx.sleep(pause)
      pause = min(pause * 2, M.RETRY)
    end
  end
  self.cleaning = false
end

local function answered(self)
  if #self.orphans > 0 and not self.cleaning then
    self.cleaning = ngx.timer.at(0, abandon_orphans, self) and true or false
  end
end

local function fallback(self, produce)
  self.counts.fallbacks = self.counts.fallbacks + 1
  return produce(), "fallback", false
end

local function fail(self, err, produce)
  note(self, err)
  return fallback(self, produce)
end

-- Calls the caller's forgotten(), once per call.
local function forgotten(opts)
  local f = opts.forgotten
  if f and not opts.told then
    opts.told = true
    pcall(f)
  end
end

---------------------------------------------------------------------------
-- Leading

-- The leader's light threads. keep_lead renews the lease every
-- renew_every while produce runs; hear_lead, when the caller wants to hear
-- of a forget, listens on the channel (through the worker's listener)
-- until the lead ends, and once its end was published, until it hears
-- that end (so that a forget told before it is heard too).
local function keep_lead(self, n, me, state)
  local lease_key = lease_of(n, me)
  while true do
    local posted = state.sema:wait(self.renew_every)
    if posted or state.stop then
      return
    end
    local res, err = call(self, "renew", 3, n.lock, lease_key, n.joined, me, self.lease_ms,
                          n.channel)
    if not res then
      note(self, err)
    elseif res == 0 and not state.lost then
      state.lost = true
      self.counts.lost = self.counts.lost + 1
    end
  end
end

local function hear_lead(self, me, state, opts)
  local w = state.hear
  local forget_msg = "f" .. me .. "\n"
  local tail = me .. "\n"
  while true do
    local now = clock()
    local limit = state.told_by or now + self.lease_ms / 1000
    if limit <= now then
      break
    end
    w.due = limit + self.grace
    local ev = next_event(w, limit - now)
    if ev == STOP or (type(ev) == "table" and ev.down)
       or (ev == MOVED and not move(self, w)) then
      break
    elseif ev == forget_msg then
      forgotten(opts)
    elseif type(ev) == "string" and ssub(ev, 2, #tail + 1) == tail
           and (byte(ev) == R or byte(ev) == A) then
      break -- the lead's end
    end
  end
  leave(w)
end

-- Ends the leader's threads: when its end was published (`told`) on a
-- subscription that was confirmed, the listener waits for that message a
-- `timeout` at most; otherwise it stops at once.
local function stop_lead(self, state, keeper, hearer, told)
  state.stop = true
  state.sema:post(1)
  if keeper then
    ngx.thread.wait(keeper)
  end
  if hearer then
    if told and state.hear.ready then
      state.told_by = clock() + self.timeout_ms / 1000
      post(state.hear, RESET) -- wakes it to see told_by (RESET means nothing to it)
    else
      post(state.hear, STOP)
    end
    ngx.thread.wait(hearer)
  end
end

local function lead(self, n, me, produce, opts)
  local c = self.counts
  c.led = c.led + 1
  local state = { sema = semaphore.new(), stop = false }
  local spawned, keeper = pcall(ngx.thread.spawn, keep_lead, self, n, me, state)
  keeper = spawned and keeper or nil
  local hearer
  if opts.forgotten then
    state.hear = join(self, n.channel)
    if state.hear then
      spawned, hearer = pcall(ngx.thread.spawn, hear_lead, self, me, state, opts)
      hearer = spawned and hearer or nil
      if not hearer then
        leave(state.hear)
      end
    end
  end
  local ok, bytes = pcall(produce)
  state.stop = true
  if not ok then
    c.abandoned = c.abandoned + 1
    local res, err, sent = call(self, "abandon", 3, n.lock, lease_of(n, me), n.joined, me,
                                n.channel)
    stop_lead(self, state, keeper, hearer, res ~= nil)
    if not res then
      note(self, err)
      if sent then
        orphan(self, n, me)
      end
    end
    error(bytes, 0)
  end
  if type(bytes) ~= "string" then
    stop_lead(self, state, keeper, hearer, false)
    error("singleflight.redis: produce returned " .. type(bytes) .. ", not the encoded outcome",
          2)
  end
  local res, err, sent = call(self, "release", 4, n.lock, lease_of(n, me), result_of(n, me),
                              n.joined, me, seal(self, n, me, bytes), self.result_ms, n.channel)
  stop_lead(self, state, keeper, hearer, res ~= nil)
  if not res then
    note(self, err)
    if sent then -- it may run later: a lock then left behind is given up
      orphan(self, n, me)
    end
    return bytes, "led", false
  end
  return bytes, "led", res[2] == 1
end

---------------------------------------------------------------------------
-- Waiting

-- Reads the channel's events until `token`'s outcome, `lease_end` (which
-- each renewal of its lease moves on) or `deadline` (the caller's): "r",
-- bytes | "a" (its leader gave up) | "check" (time to look at the lease) |
-- "reset" (the listener's connection broke: look again once subscribed) |
-- "timeout" | nil, why.
local function listen(self, w, n, token, lease_end, deadline, opts)
  while true do
    local now = clock()
    if deadline and now >= deadline then
      return "timeout"
    end
    local limit = deadline and deadline < lease_end and deadline or lease_end
    if limit <= now then
      return "check"
    end
    w.due = limit + self.grace
    local ev = next_event(w, limit - now)
    if ev == MOVED then
      local ok, err = move(self, w)
      if not ok then
        return nil, err
      end
      return "reset"
    elseif ev == RESET then
      return "reset"
    elseif type(ev) == "table" and ev.down then
      return nil, ev.down
    elseif type(ev) == "string" then
      local nl = find(ev, "\n", 2, true)
      if nl and ssub(ev, 2, nl - 1) == token then
        local kind = ssub(ev, 1, 1)
        if kind == "r" then
          local bytes = unseal(self, n, token, ssub(ev, nl + 1))
          if bytes then
            return "r", bytes
          end
          refused(self) -- and the real one may still come
        elseif kind == "a" then
          return "a"
        elseif kind == "f" then
          forgotten(opts)
        elseif kind == "h" then -- the lease was renewed just now
          lease_end = clock() + (self.lease_ms + MARGIN_MS) / 1000
        end
      end
    end
  end
end

local function timed_out(self)
  self.counts.timeouts = self.counts.timeouts + 1
  return nil, "timeout", false
end

-- The channel subscribed, or the wait given up: timed out, or `produce`
-- run here.
local function subscribed(self, w, produce, deadline)
  local ok, err = ready(self, w, deadline)
  if ok then
    return true
  end
  leave(w)
  if err == "timeout" then
    return false, timed_out(self)
  end
  return false, fail(self, err, produce)
end

local function wait(self, n, me, token, produce, opts, deadline)
  local c = self.counts
  if deadline and clock() >= deadline then
    return timed_out(self)
  end
  local w, err = join(self, n.channel)
  if not w then
    return fail(self, err, produce)
  end
  local on, bytes, how, shared = subscribed(self, w, produce, deadline)
  if not on then
    return bytes, how, shared
  end
  w.counts, c.waiting = c, c.waiting + 1
  -- subscribed before this first step: no message can be missed
  while true do
    local res, sent
    w.due = clock() + self.grace
    res, err, sent = call(self, "step", 5, n.lock, lease_of(n, token), result_of(n, token),
                          lease_of(n, me), n.joined, token, me, self.lease_ms)
    if not res then
      leave(w)
      if sent then
        orphan(self, n, me)
      end
      return fail(self, err, produce)
    elseif res[1] == 2 then
      leave(w)
      bytes = unseal(self, n, token, res[2])
      if not bytes then -- as if its leader went away without a trace: here, then
        refused(self)
        return fallback(self, produce)
      end
      c.waited = c.waited + 1
      return bytes, "waited", true
    elseif res[1] == 1 then
      leave(w)
      c.takeovers = c.takeovers + 1
      return lead(self, n, me, produce, opts)
    end
    token = res[2]
    if res[4] == 0 then
      forgotten(opts)
    end
    local ttl = res[3]
    if type(ttl) ~= "number" or ttl < 0 then
      ttl = self.lease_ms
    end
    local kind
    kind, bytes = listen(self, w, n, token, clock() + (ttl + MARGIN_MS) / 1000, deadline, opts)
    if kind == "r" then
      leave(w)
      c.waited = c.waited + 1
      return bytes, "waited", true
    elseif kind == "timeout" then
      leave(w)
      return timed_out(self)
    elseif kind == "reset" then
      on, bytes, how, shared = subscribed(self, w, produce, deadline)
      if not on then
        return bytes, how, shared
      end
    elseif not kind then
      leave(w)
      return fail(self, bytes, produce)
    end
    -- "check" (the lease's time is up), "a" (the leader gave up) or
    -- "reset" (subscribed anew): step
  end
end

---------------------------------------------------------------------------
-- The fleet

--- A fleet handle over the Redis of `settings` (see check), for the group
-- `space`: { shm = the lua_shared_dict's name, group = the name of a group
-- made by singleflight.group, or nil }. Connects lazily: Redis down now is
-- no error.
function M.new(settings, space)
  local s = checked(settings, "new", 1)
  if type(space) ~= "table" or type(space.shm) ~= "string"
     or (space.group ~= nil and type(space.group) ~= "string") then
    error("bad argument #2 to 'new' ({ shm = string, group = string or nil } expected)", 2)
  end
  load_env()
  if s.secret and not ngx.hmac_sha1 then
    error("bad option 'redis' to 'new' (field 'secret': this nginx has no ngx.hmac_sha1)", 2)
  end
  local self = setmetatable({
    password = s.password, db = s.db, secret = s.secret, pool_size = s.pool_size,
    username = s.username,
    ssl = s.ssl, ssl_verify = s.ssl_verify or false, server_name = s.server_name,
    head = escaped(s.prefix) .. "{" .. escaped(space.shm) .. "|"
           .. (space.group and "=" .. escaped(space.group) or "-") .. "|",
    lease_ms = ceil(s.lease * 1000), timeout_ms = ceil(s.timeout * 1000),
    renew_every = s.lease / 3,
    result_ms = ceil(max(s.lease, 2 * s.timeout, 2) * 1000),
    -- how long a waiter may go without looking at its events: a step (a
    -- retry included) and then some
    grace = SWEEP + 3 * s.timeout,
    sub_verb = s.cluster and "SSUBSCRIBE" or "SUBSCRIBE",
    unsub_verb = s.cluster and "SUNSUBSCRIBE" or "UNSUBSCRIBE",
    scripts = s.cluster and SHARDED or SCRIPTS, shas = s.cluster and SHARDED_SHA or SHA,
    idle_ms = 60000, pools = {},
    down_until = 0, next_log = 0, unlogged = 0, next_refused_log = 0, orphans = {},
    cleaning = false,
    counts = {
      led = 0, waited = 0, fallbacks = 0, takeovers = 0, abandoned = 0, lost = 0,
      errors = 0, commands = 0, timeouts = 0, refused = 0, waiting = 0,
    },
  }, fleet)
  local function list(ns)
    local t = {}
    for i, n in ipairs(ns) do
      ns[i] = node_at(n.host, n.port)
      t[i] = ns[i].addr
    end
    return concat(t, ",")
  end
  if s.sentinels then
    self.sentinels, self.master_name, self.sentinel_first = s.sentinels, s.master_name, 1
    self.sentinel_password, self.sentinel_username = s.sentinel_password, s.sentinel_username
    self.where = format("master %q of sentinels %s", s.master_name, list(s.sentinels))
  elseif s.cluster then
    self.cluster = s.cluster
    self.where = "cluster " .. list(s.cluster)
  elseif s.path then
    self.node = { path = s.path, addr = "unix:" .. s.path }
    self.where = self.node.addr
  else
    self.node = node_at(s.host, s.port)
    self.where = self.node.addr
  end
  local creds = function(user, password)
    return password and ngx.md5((user or "") .. "\0" .. password) or ""
  end
  local tls = s.ssl and ":ssl:" .. tostring(s.ssl_verify) .. ":" .. (s.server_name or "") or ""
  -- a pool per server and credentials (pools_of), at most pool_size
  -- connections open (default: lua_socket_pool_size), the callers beyond
  -- them queued
  local id = "singleflight.redis:" .. self.where .. ":" .. s.db .. ":"
             .. creds(s.username, s.password) .. tls
  self.pool_id, self.hub_id = id, id
  if s.sentinels then
    local sid = id .. ":" .. creds(s.sentinel_username, s.sentinel_password)
    for _, n in ipairs(s.sentinels) do
      n.opts = { pool = "singleflight.sentinel:" .. n.addr .. ":"
                        .. creds(s.sentinel_username, s.sentinel_password) .. tls }
    end
    self.sentinel_id = sid
  elseif s.cluster then
    local map = maps[id]
    if not map then
      map = { nodes = {}, stale = true, busy = false, retry_at = 0 }
      maps[id] = map
    end
    self.map = map
  end
  return self
end

local NO_OPTS = {}

--- The outcome of `key` across the fleet: bytes, "led" | "waited" |
-- "fallback" | "timeout" (no bytes), and whether it was handed across
-- instances. opts (optional): wait, the seconds a wait on another instance
-- may last; forgotten, called when the execution is forgotten. Errors
-- raised by produce propagate.
function fleet:outcome(key, produce, opts)
  if type(key) ~= "string" then
    error("bad argument #1 to 'outcome' (string expected, got " .. type(key) .. ")", 2)
  end
  opts = opts and { wait = opts.wait, forgotten = opts.forgotten } or NO_OPTS
  if not COSOCKET_PHASES[ngx.get_phase()] then
    return fallback(self, produce)
  end
  local now = clock()
  if now < self.down_until then
    return fallback(self, produce)
  end
  local deadline = opts.wait and now + opts.wait
  local n, me = names_of(self, key), new_token()
  local res, err, sent = call(self, "acquire", 3, n.lock, lease_of(n, me), n.joined, me,
                              self.lease_ms)
  if not res then
    if sent then
      orphan(self, n, me)
    end
    return fail(self, err, produce)
  end
  answered(self)
  if res[1] == 1 then
    return lead(self, n, me, produce, opts)
  end
  return wait(self, n, me, res[2], produce, opts, deadline)
end

-- forget from a phase without cosockets: a timer runs it.
local function forget_later(premature, self, key)
  if not premature then
    self:forget(key)
  end
end

--- Later callers of `key` across the fleet start a new execution; callers
-- waiting on the running one still get its outcome. True if one was
-- running; false, why if Redis could not be asked (in a phase without
-- cosockets a timer asks it: false, "later").
function fleet:forget(key)
  if type(key) ~= "string" then
    error("bad argument #1 to 'forget' (string expected, got " .. type(key) .. ")", 2)
  end
  if not COSOCKET_PHASES[ngx.get_phase()] then
    local ok, err = ngx.timer.at(0, forget_later, self, key)
    return false, ok and "later" or err
  end
  local n = names_of(self, key)
  local res, err = call(self, "forget", 1, n.lock, n.channel)
  if not res then
    note(self, err)
    return false, err
  end
  return res == 1
end

--- This worker's counters, in a fresh table (and `waiting`: its calls
-- waiting on another instance now).
function fleet:stats()
  local t = {}
  for k, v in pairs(self.counts) do
    t[k] = v
  end
  return t
end

return M
