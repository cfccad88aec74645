--- singleflight.redis: one execution per key across a fleet of OpenResty
-- instances that share a Redis server (Redis 6 and later).
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
local pcall, require, rawget, tonumber = pcall, require, rawget, tonumber
local ceil, floor, huge, max, min = math.ceil, math.floor, math.huge, math.max, math.min
local byte, find, format, gsub, ssub = string.byte, string.find, string.format, string.gsub,
                                       string.sub
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
}

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
  for _, k in pairs { "path", "host", "secret", "username", "server_name" } do
    if s[k] == "" then
      bad(format("field '%s': non-empty string expected, got \"\"", k))
    end
  end
  for k, v in pairs(DEFAULTS) do
    if s[k] == nil then
      s[k] = v
    end
  end
  if not s.path then
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

local SHA = {}

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

-- Servers whose eviction policy this worker asked about.
local policy_asked = {}

-- Warns (once per worker and server) when the server may evict keys: every
-- key of the protocol has an expiry, so any policy but noeviction, with a
-- maxmemory, may drop a running call's lease, and another instance then
-- runs the call again. A server that refuses CONFIG is left alone.
local function ask_policy(self, sock)
  policy_asked[self.where] = true
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
    ngx.log(ngx.WARN, "singleflight: redis at ", self.where, " evicts keys (maxmemory ", limit,
            ", maxmemory-policy ", policy, "): under memory pressure it may drop the lease of ",
            "a running call, which another instance then runs again; noeviction keeps them")
  end
end

-- A new connection's AUTH (and SELECT, unless `subscriber`): true, or nil, why.
local function greet(self, sock, subscriber)
  local ok, err
  if self.password then
    self.counts.commands = self.counts.commands + 1
    if self.username then
      ok, err = ask(sock, "AUTH", self.username, self.password)
    else
      ok, err = ask(sock, "AUTH", self.password)
    end
    if not ok then
      return nil, "auth: " .. tostring(err)
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

-- A connection to the server, ready for commands (from the pool: at most
-- pool_size of the worker's are open at a time, a caller beyond them waits
-- its turn) or, `subscriber`, a new one for the listener; and whether it
-- was used before; or nil, why.
local function connect(self, subscriber)
  local sock = ngx.socket.tcp()
  sock:settimeout(self.timeout_ms)
  local opts = subscriber and self.listen_opts or self.connect_opts
  local ok, err
  if self.path then
    ok, err = sock:connect("unix:" .. self.path, opts)
  else
    ok, err = sock:connect(self.host, self.port, opts)
  end
  if not ok then
    return nil, "connect: " .. tostring(err)
  end
  local reused = (sock:getreusedtimes() or 0) > 0
  if not reused then
    if self.ssl then
      ok, err = sock:sslhandshake(nil, self.server_name, self.ssl_verify)
      if not ok then
        sock:close()
        return nil, "ssl: " .. tostring(err)
      end
    end
    ok, err = greet(self, sock, subscriber)
    if not ok then
      sock:close()
      return nil, err
    end
    if not subscriber and not policy_asked[self.where] then
      ask_policy(self, sock)
    end
  end
  return sock, nil, reused
end

local function keep(self, sock)
  if not sock:setkeepalive(self.idle_ms) then
    sock:close()
  end
end

-- Runs a script; the reply or nil, why (the connection then closed) and
-- whether the connection failed (rather than Redis answering an error).
local function run(self, sock, name, nkeys, ...)
  self.counts.commands = self.counts.commands + 1
  local res, err
  local sha = SHA[name]
  if sha then
    res, err = ask(sock, "EVALSHA", sha, nkeys, ...)
    if res == false and err and find(err, "NOSCRIPT", 1, true) then
      self.counts.commands = self.counts.commands + 1
      res, err = ask(sock, "EVAL", SCRIPTS[name], nkeys, ...)
    end
  else
    res, err = ask(sock, "EVAL", SCRIPTS[name], nkeys, ...)
  end
  if not res then
    sock:close()
    return nil, name .. ": " .. tostring(err), res == nil
  end
  return res
end

-- Runs a script on a connection of its own from the pool: the reply, or
-- nil, why, and true if the script may have run all the same (it was sent).
-- A pooled connection that the server closed meanwhile (Redis restarted)
-- gets one retry on a new one: the scripts may run twice.
local function call(self, name, nkeys, ...)
  for attempt = 1, 2 do
    local sock, err, reused = connect(self)
    if not sock then
      return nil, err, attempt > 1
    end
    local res, broken
    res, err, broken = run(self, sock, name, nkeys, ...)
    if res then
      keep(self, sock)
      return res
    end
    if attempt == 2 or not (reused and broken) or find(err, "timeout", 1, true) then
      return nil, err, true
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

local READY, RESET, STOP = { "ready" }, { "reset" }, { "stop" }

-- The listeners of this worker, by server and credentials.
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

local function on_reply(hub, st, res)
  local kind, channel = res[1], res[2]
  local e = hub.channels[channel]
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
    if e then
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
    elseif res == false and err then
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
  local conf = hub.conf
  for verb, list in pairs { [conf.sub_verb] = subs, [conf.unsub_verb] = unsubs } do
    for i = 1, #list, BATCH do
      local args = { verb }
      for j = i, min(i + BATCH - 1, #list) do
        args[#args + 1] = list[j]
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
      sock, err = connect(hub.conf, true)
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

-- Joins `channel`: a caller's handle for next_event, or nil, why.
local function join(self, channel)
  local hub = hubs[self.hub_id]
  if not hub then
    hub = { conf = self, channels = {}, nchan = 0, dirty = {}, wake = semaphore.new(),
            poked = false, running = false }
    hubs[self.hub_id] = hub
  end
  if not hub.running then
    local ok, err = ngx.timer.at(0, listener, hub)
    if not ok then
      return nil, "listener: " .. tostring(err)
    end
    hub.running = true
  end
  local e = hub.channels[channel]
  if not e then
    e = { waiters = {}, n = 0, state = "off", since = 0 }
    hub.channels[channel], hub.nchan = e, hub.nchan + 1
  end
  local w = { sema = semaphore.new(), q = {}, head = 1, tail = 0, hub = hub, entry = e,
              channel = channel, ready = e.state == "on", due = huge }
  e.waiters[w], e.n = true, e.n + 1
  if not w.ready then
    dirty(hub, channel)
  end
  return w
end

local function leave(w)
  if w.counts then -- a waiter no longer
    w.counts.waiting, w.counts = w.counts.waiting - 1, nil
  end
  local e = w.entry
  if e.waiters[w] then
    e.waiters[w], e.n = nil, e.n - 1
    if e.n == 0 then
      dirty(w.hub, w.channel)
    end
  end
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
    if ev == STOP or (type(ev) == "table" and ev.down) then
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
    if ev == RESET then
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
    host = s.host, port = s.port, path = s.path, password = s.password, db = s.db,
    secret = s.secret, pool_size = s.pool_size, username = s.username,
    ssl = s.ssl, ssl_verify = s.ssl_verify or false, server_name = s.server_name,
    head = escaped(s.prefix) .. "{" .. escaped(space.shm) .. "|"
           .. (space.group and "=" .. escaped(space.group) or "-") .. "|",
    lease_ms = ceil(s.lease * 1000), timeout_ms = ceil(s.timeout * 1000),
    renew_every = s.lease / 3,
    result_ms = ceil(max(s.lease, 2 * s.timeout, 2) * 1000),
    -- how long a waiter may go without looking at its events: a step (a
    -- retry included) and then some
    grace = SWEEP + 3 * s.timeout,
    sub_verb = "SUBSCRIBE", unsub_verb = "UNSUBSCRIBE",
    idle_ms = 60000,
    where = s.path and ("unix:" .. s.path) or (s.host .. ":" .. s.port),
    down_until = 0, next_log = 0, unlogged = 0, next_refused_log = 0, orphans = {},
    cleaning = false,
    counts = {
      led = 0, waited = 0, fallbacks = 0, takeovers = 0, abandoned = 0, lost = 0,
      errors = 0, commands = 0, timeouts = 0, refused = 0, waiting = 0,
    },
  }, fleet)
  -- a pool per server and credentials, at most pool_size connections open
  -- (default: lua_socket_pool_size), the callers beyond them queued
  local id = "singleflight.redis:" .. self.where .. ":" .. s.db .. ":"
             .. (s.password and ngx.md5((s.username or "") .. "\0" .. s.password) or "")
             .. (s.ssl and ":ssl:" .. tostring(s.ssl_verify) .. ":" .. (s.server_name or "")
                 or "")
  self.connect_opts = { pool = id, pool_size = s.pool_size, backlog = BACKLOG }
  self.listen_opts = { pool = id .. ":listener" }
  self.hub_id = id
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
