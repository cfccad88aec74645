--- singleflight.redis: one execution per key across a fleet of OpenResty
-- instances that share a Redis server (Redis 6 and later).
--
-- The tier above (one caller per instance and key reaches it) calls
--
--   local fleet = require("singleflight.redis").new(settings)
--   local bytes, how, n = fleet:outcome(key, produce)
--
-- produce() runs the call in this instance and returns its outcome encoded
-- as a string; outcome returns the bytes of the one execution across the
-- fleet, produce()'s own or another instance's, and how it got them: "led"
-- (produce ran here; n: how many instances it was published to), "waited"
-- (another instance's) or "fallback" (Redis was unusable: produce ran here,
-- unshared). Nothing Redis does fails a call.
--
-- The protocol, per call of key k, with t = "{" .. prefix .. k .. "}" (a
-- hash tag: every key of one call lives in one slot of a Redis Cluster):
--
--   t:lock            the token of the current execution, PX lease
--   t:lease:<token>   that execution's lease, PX lease, renewed by its
--                     leader every lease/3 while produce runs
--   t:result:<token>  its outcome, for a few seconds after it ends
--   channel t:done:<db>   "r<token>\n<bytes>" when it ends, "h<token>\n"
--                     at each renewal, "a<token>\n" when produce raised
--
-- A caller runs ACQUIRE: the lock is free, it leads; otherwise it
-- subscribes to the channel, then runs STEP (the result, or how long the
-- lease has left, or the lease run out: take over), then blocks reading the
-- subscription until its execution's outcome; each renewal's message moves
-- the waiter's deadline on, so only a leader gone silent for a whole lease
-- makes it STEP again (and take over if the lease has run out). The leader
-- ends with RELEASE: the result stored, published, its lease and (if still
-- current) the lock deleted, in one script, so a waiter's STEP never sees a
-- free lock before the result exists. forget deletes the lock only: the running execution
-- keeps its lease and still reaches its waiters, later callers start anew,
-- and its RELEASE leaves the lock of its successor alone.

local error, pairs, setmetatable, tostring, type = error, pairs, setmetatable, tostring, type
local pcall, require, rawget = pcall, require, rawget
local ceil, floor, huge = math.ceil, math.floor, math.huge
local byte, find, format, gsub, ssub = string.byte, string.find, string.format, string.gsub,
                                       string.sub
local open = io.open

local M = {}

-- Seconds a worker leaves Redis alone after a failure (calls fall back at
-- once meanwhile), and between two log lines about failures.
M.RETRY = 1
M.LOG_EVERY = 60

-- Milliseconds a waiter adds to the lease's time left before it checks.
local MARGIN_MS = 10
-- Messages of other executions a waiter reads before it checks anyway.
local MAX_FOREIGN = 1000

local DEFAULTS = { prefix = "singleflight:", lease = 5, timeout = 0.5 }

---------------------------------------------------------------------------
-- Settings

local FIELDS = {
  host = "string", path = "string", password = "string", prefix = "string",
  port = "port", db = "index", pool_size = "count", lease = "seconds", timeout = "seconds",
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
  if s.path == "" or s.host == "" then
    bad(format("field '%s': non-empty string expected, got \"\"", s.path and "path" or "host"))
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
  return checked(settings, fname or "new", level or 1)
end

---------------------------------------------------------------------------
-- Scripts (each touches the keys of one call, all given in KEYS)

local SCRIPTS = {
  -- KEYS lock, lease(me); ARGV me, lease_ms
  -- -> {1}: lead | {0, token, ttl_ms}: wait on token
  -- (run twice, it answers the same: a retry is harmless)
  acquire = [[
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return {1} end
if cur then return {0, cur, redis.call('PTTL', KEYS[1])} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return {1}
]],
  -- KEYS lock, lease(tok), result(tok), lease(me); ARGV tok, me, lease_ms
  -- -> {2, bytes}: tok's outcome | {0, token, ttl_ms}: wait on token
  --    | {1}: tok's lease ran out and no other execution runs: lead
  step = [[
local r = redis.call('GET', KEYS[3])
if r then return {2, r} end
local ttl = redis.call('PTTL', KEYS[2])
if ttl ~= -2 then return {0, ARGV[1], ttl} end
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[2] then return {1} end
if cur and cur ~= ARGV[1] then return {0, cur, redis.call('PTTL', KEYS[1])} end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
return {1}
]],
  -- KEYS lock, lease(me); ARGV me, lease_ms, channel
  -- -> 1: renewed, and the waiters told | 0: lease lost
  renew = [[
if redis.call('PEXPIRE', KEYS[2], ARGV[2]) == 0 then return 0 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
redis.call('PUBLISH', ARGV[3], 'h' .. ARGV[1] .. '\n')
return 1
]],
  -- KEYS lock, lease(me), result(me); ARGV me, bytes, result_ms, channel
  -- -> how many subscribers got the message
  release = [[
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
local n = redis.call('PUBLISH', ARGV[4], 'r' .. ARGV[1] .. '\n' .. ARGV[2])
redis.call('DEL', KEYS[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return n
]],
  -- KEYS lock, lease(me); ARGV me, channel
  abandon = [[
redis.call('DEL', KEYS[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return redis.call('PUBLISH', ARGV[2], 'a' .. ARGV[1] .. '\n')
]],
}

local SHA = {}

local function hex(bin)
  return (gsub(bin, ".", function(c) return format("%02x", byte(c)) end))
end

---------------------------------------------------------------------------
-- The environment: ngx, the client, a token unique across the fleet

local ngx, client, semaphore

local function load_env()
  if client then
    return
  end
  ngx = rawget(_G, "ngx")
  if type(ngx) ~= "table" or not ngx.socket then
    error("singleflight: the 'redis' option needs OpenResty (nginx with ngx_lua)", 3)
  end
  local ok, mod = pcall(require, "resty.redis")
  if not ok then
    ok, mod = pcall(require, "nginx.redis")
  end
  if not ok then
    error("singleflight: the 'redis' option needs lua-resty-redis (resty.redis, or "
          .. "nginx.redis from Debian's lua-nginx-redis)", 3)
  end
  client = mod
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
-- Connections

local fleet = {}
fleet.__index = fleet

-- A connection from the pool (authenticated and on the db) and whether it
-- was used before, or nil, why.
local function connect(self)
  local red, err = client:new()
  if not red then
    return nil, "socket: " .. tostring(err)
  end
  red:set_timeout(self.timeout_ms)
  local ok
  if self.path then
    ok, err = red:connect("unix:" .. self.path, self.connect_opts)
  else
    ok, err = red:connect(self.host, self.port, self.connect_opts)
  end
  if not ok then
    return nil, "connect: " .. tostring(err)
  end
  local reused = (red:get_reused_times() or 0) > 0
  if not reused then
    if self.password then
      self.counts.commands = self.counts.commands + 1
      ok, err = red:auth(self.password)
      if not ok then
        red:close()
        return nil, "auth: " .. tostring(err)
      end
    end
    if self.db ~= 0 then
      self.counts.commands = self.counts.commands + 1
      ok, err = red:select(self.db)
      if not ok then
        red:close()
        return nil, "select: " .. tostring(err)
      end
    end
  end
  return red, nil, reused
end

local function keep(self, red)
  if not red:set_keepalive(self.idle_ms, self.pool_size) then
    red:close()
  end
end

-- Runs a script; the reply or nil, why (the connection then closed) and
-- whether the connection failed (rather than Redis answering an error).
local function run(self, red, name, nkeys, ...)
  self.counts.commands = self.counts.commands + 1
  local res, err
  local sha = SHA[name]
  if sha then
    res, err = red:evalsha(sha, nkeys, ...)
    if not res and err and find(err, "NOSCRIPT", 1, true) then
      self.counts.commands = self.counts.commands + 1
      res, err = red:eval(SCRIPTS[name], nkeys, ...)
    end
  else
    res, err = red:eval(SCRIPTS[name], nkeys, ...)
  end
  if not res then
    red:close()
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
    local red, err, reused = connect(self)
    if not red then
      return nil, err, attempt > 1
    end
    local res, broken
    res, err, broken = run(self, red, name, nkeys, ...)
    if res then
      keep(self, red)
      return res
    end
    if attempt == 2 or not (reused and broken) or find(err, "timeout", 1, true) then
      return nil, err, true
    end
  end
end

---------------------------------------------------------------------------
-- Names

local function escape(c)
  return format("%%%02X", byte(c))
end

local function names_of(self, key)
  -- no "}" inside the tag: its end is the one after prefix .. key
  local tag = "{" .. gsub(self.prefix .. key, "[%%}]", escape) .. "}"
  return { tag = tag, lock = tag .. ":lock", channel = tag .. ":done:" .. self.db }
end

local function lease_of(n, token)
  return n.tag .. ":lease:" .. token
end

local function result_of(n, token)
  return n.tag .. ":result:" .. token
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
-- abandoned once Redis answers again.
local MAX_ORPHANS = 100

local function orphan(self, n, me)
  local o = self.orphans
  if #o < MAX_ORPHANS then
    o[#o + 1] = { n.lock, lease_of(n, me), me, n.channel }
  end
end

local function abandon_orphans(premature, self)
  if premature then
    self.cleaning = false
    return
  end
  local o = self.orphans
  while #o > 0 do
    local t = o[#o]
    local res, err = call(self, "abandon", 2, t[1], t[2], t[3], t[4])
    if not res then
      note(self, err)
      break
    end
    o[#o] = nil
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
  return produce(), "fallback"
end

local function fail(self, err, produce)
  note(self, err)
  return fallback(self, produce)
end

---------------------------------------------------------------------------
-- Leading

local function renew_loop(self, n, me, state)
  local lease_key = lease_of(n, me)
  while true do
    local posted = state.sema:wait(self.renew_every)
    if posted or state.stop then
      return
    end
    local res, err = call(self, "renew", 2, n.lock, lease_key, me, self.lease_ms, n.channel)
    if not res then
      note(self, err)
    elseif res == 0 and not state.lost then
      state.lost = true
      self.counts.lost = self.counts.lost + 1
    end
  end
end

local function lead(self, n, me, produce)
  local c = self.counts
  c.led = c.led + 1
  local state = { sema = semaphore.new(), stop = false }
  local spawned, thread = pcall(ngx.thread.spawn, renew_loop, self, n, me, state)
  local ok, bytes = pcall(produce)
  state.stop = true
  if spawned then
    state.sema:post(1)
    ngx.thread.wait(thread)
  end
  if not ok then
    c.abandoned = c.abandoned + 1
    local _, err = call(self, "abandon", 2, n.lock, lease_of(n, me), me, n.channel)
    if err then
      note(self, err)
    end
    error(bytes, 0)
  end
  if type(bytes) ~= "string" then
    error("singleflight.redis: produce returned " .. type(bytes) .. ", not the encoded outcome",
          2)
  end
  local res, err = call(self, "release", 3, n.lock, lease_of(n, me), result_of(n, me), me, bytes,
                        self.result_ms, n.channel)
  if not res then
    note(self, err)
  end
  return bytes, "led", res or 0
end

---------------------------------------------------------------------------
-- Waiting

-- Leaves the channel and puts the connection back, or closes it.
local function leave(self, sub, channel)
  sub:set_timeout(self.timeout_ms)
  self.counts.commands = self.counts.commands + 1
  local res = sub:unsubscribe(channel)
  for _ = 1, MAX_FOREIGN do
    if type(res) ~= "table" then
      return sub:close()
    elseif res[1] == "unsubscribe" then
      return keep(self, sub)
    end
    res = sub:read_reply()
  end
  sub:close()
end

-- Reads the subscription until `token`'s outcome or `deadline`, which each
-- renewal of its lease moves on: "r", bytes | "a" (its leader gave up) |
-- "check" (time to look at the lease) | nil, why.
local function listen(self, sub, channel, token, deadline)
  for _ = 1, MAX_FOREIGN do
    local ms = ceil((deadline - clock()) * 1000)
    if ms <= 0 then
      return "check"
    end
    sub:set_timeout(ms)
    local res, err = sub:read_reply()
    if not res then
      if err == "timeout" then
        return "check"
      end
      return nil, "subscription: " .. tostring(err)
    end
    if res[1] == "message" and res[2] == channel then
      local m = res[3]
      local nl = find(m, "\n", 2, true)
      if nl and ssub(m, 2, nl - 1) == token then
        local kind = ssub(m, 1, 1)
        if kind == "r" then
          return "r", ssub(m, nl + 1)
        elseif kind == "a" then
          return "a"
        end
        -- "h": the lease was renewed just now
        deadline = clock() + (self.lease_ms + MARGIN_MS) / 1000
      end
    end
  end
  return "check"
end

local function wait(self, n, me, token, produce)
  local c = self.counts
  local sub, err = connect(self)
  if not sub then
    return fail(self, err, produce)
  end
  c.commands = c.commands + 1
  local ok
  ok, err = sub:subscribe(n.channel)
  if not ok then
    sub:close()
    return fail(self, "subscribe: " .. tostring(err), produce)
  end
  -- subscribed before this first step: no message can be missed
  while true do
    local res, sent
    res, err, sent = call(self, "step", 4, n.lock, lease_of(n, token), result_of(n, token),
                          lease_of(n, me), token, me, self.lease_ms)
    if not res then
      sub:close()
      if sent then
        orphan(self, n, me)
      end
      return fail(self, err, produce)
    elseif res[1] == 2 then
      leave(self, sub, n.channel)
      c.waited = c.waited + 1
      return res[2], "waited"
    elseif res[1] == 1 then
      leave(self, sub, n.channel)
      c.takeovers = c.takeovers + 1
      return lead(self, n, me, produce)
    end
    token = res[2]
    local ttl = res[3]
    if type(ttl) ~= "number" or ttl < 0 then
      ttl = self.lease_ms
    end
    local kind, bytes = listen(self, sub, n.channel, token, clock() + (ttl + MARGIN_MS) / 1000)
    if kind == "r" then
      leave(self, sub, n.channel)
      c.waited = c.waited + 1
      return bytes, "waited"
    elseif not kind then
      sub:close()
      return fail(self, bytes, produce)
    end
    -- "check" (the lease's time is up) or "a" (the leader gave up): step
  end
end

---------------------------------------------------------------------------
-- The fleet

--- A fleet handle over the Redis of `settings` (see check). Connects
-- lazily: Redis down now is no error.
function M.new(settings, fname, level)
  local s = checked(settings, fname or "new", level or 1)
  load_env()
  local self = setmetatable({
    host = s.host, port = s.port, path = s.path, password = s.password, db = s.db,
    prefix = s.prefix, pool_size = s.pool_size,
    lease_ms = ceil(s.lease * 1000), timeout_ms = ceil(s.timeout * 1000),
    renew_every = s.lease / 3,
    result_ms = ceil(math.max(s.lease, 2 * s.timeout, 2) * 1000),
    idle_ms = 60000,
    where = s.path and ("unix:" .. s.path) or (s.host .. ":" .. s.port),
    down_until = 0, next_log = 0, unlogged = 0, orphans = {}, cleaning = false,
    counts = {
      led = 0, waited = 0, fallbacks = 0, takeovers = 0, abandoned = 0, lost = 0,
      errors = 0, commands = 0,
    },
  }, fleet)
  self.connect_opts = {
    pool = "singleflight.redis:" .. self.where .. ":" .. s.db .. ":"
           .. (s.password and ngx.md5(s.password) or ""),
  }
  return self
end

--- The outcome of `key` across the fleet: bytes, "led" | "waited" |
-- "fallback" (and for "led", how many instances the outcome went to).
-- Errors raised by produce propagate.
function fleet:outcome(key, produce)
  if type(key) ~= "string" then
    error("bad argument #1 to 'outcome' (string expected, got " .. type(key) .. ")", 2)
  end
  if not COSOCKET_PHASES[ngx.get_phase()] then
    return fallback(self, produce)
  end
  if clock() < self.down_until then
    return fallback(self, produce)
  end
  local n, me = names_of(self, key), new_token()
  local res, err, sent = call(self, "acquire", 2, n.lock, lease_of(n, me), me, self.lease_ms)
  if not res then
    if sent then
      orphan(self, n, me)
    end
    return fail(self, err, produce)
  end
  answered(self)
  if res[1] == 1 then
    return lead(self, n, me, produce)
  end
  return wait(self, n, me, res[2], produce)
end

--- Later callers of `key` across the fleet start a new execution; callers
-- waiting on the running one still get its outcome. True if one was
-- running; false, why if Redis could not be asked.
function fleet:forget(key)
  if type(key) ~= "string" then
    error("bad argument #1 to 'forget' (string expected, got " .. type(key) .. ")", 2)
  end
  if not COSOCKET_PHASES[ngx.get_phase()] then
    return false, "no cosockets in the " .. ngx.get_phase() .. " phase"
  end
  local red, err = connect(self)
  if not red then
    note(self, err)
    return false, err
  end
  self.counts.commands = self.counts.commands + 1
  local res
  res, err = red:del(names_of(self, key).lock)
  if not res then
    red:close()
    note(self, "del: " .. tostring(err))
    return false, err
  end
  keep(self, red)
  return res == 1
end

--- This worker's counters, in a fresh table.
function fleet:stats()
  local t = {}
  for k, v in pairs(self.counts) do
    t[k] = v
  end
  return t
end

return M
