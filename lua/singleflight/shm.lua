--- singleflight.shm: one execution per key across the workers of an nginx
-- instance, over a lua_shared_dict (`singleflight.new { shm = "name" }`).
--
-- Each worker deduplicates its own callers first (the ordinary call): the
-- first caller of a key in a worker runs step() below for all of them, and
-- the worker's other callers wait on it locally. step() either leads for
-- the whole instance or watches the leader in another worker. The dict
-- holds, per key (base: the group's namespace and the key, hashed when
-- long):
--
--   l<gen>:<base>  the lock: the leader's token, added only if absent, with
--                  a lease for an expiry. A timer of the leader's worker
--                  renews it while fn runs (never past max_age), so a live
--                  leader keeps it and a dead worker's runs out within the
--                  lease; a lead whose request went away is let go by the
--                  same timer (its lock deleted).
--   p<gen>:<base>  the token of the last execution that took the lock. One
--                  that takes it after an execution went away without a
--                  result answers that one's watchers too.
--   w<token>       the watchers of an execution: one count per worker that
--                  waits on it. The leader closes it (adds CLOSED) when fn
--                  returns: watchers that counted themselves in before are
--                  sure to find the result.
--   r<token>       the result, encoded once by the group's codec (or the
--                  core's value copier); the last watcher to read it
--                  deletes it (or it expires).
--   g<base>        the generation, only after a forget: later callers use
--                  the next lock, and those waiting on the forgotten
--                  execution still get its result. Every leader of the key,
--                  a forgotten one too, renews it with its lock: it lives as
--                  long as an execution it set apart can still be joined,
--                  and runs out soon after the key's last one.
--   s              the dict's change count, bumped whenever a lock is let
--                  go.
--   c<name>:<ns>   the group's counter <name> for the whole instance (see
--                  publish): a fixed number per group, with no expiry.
--
-- A watcher waits on a semaphore. One light thread per worker (while
-- anyone watches) reads the change count every millisecond and wakes the
-- watchers whose lock changed; a watcher also wakes when its lock's lease
-- would run out. Then the result is there, or the leader went away and the
-- first to add the lock again leads. Every entry but the counters has an
-- expiry of a few seconds at most: the dict holds in-flight state and a
-- fixed number of counters per group, never a cache.
-- When the dict is full, calls fall back to this worker alone, counted and
-- logged.

local core = require "singleflight.core"
local panic = require "singleflight.panic"
local runner = require "singleflight.runner"
local backends = require "singleflight.backends"
local flow = require "singleflight.flow"
local flights = require "singleflight.flights"
local liveness = require "singleflight.liveness"
local future = require "singleflight.future"
local codec_default = require("singleflight.codec").default

local ngx = rawget(_G, "ngx")
if type(ngx) ~= "table" or type(ngx.shared) ~= "table" then
  error("singleflight: the shm option needs OpenResty (ngx_lua)", 2)
end

local error, getmetatable, ipairs, next, pairs, pcall, rawget, select, setmetatable, tostring,
      type =
      error, getmetatable, ipairs, next, pairs, pcall, rawget, select, setmetatable, tostring,
      type
local unpack = table.unpack or unpack -- luacheck: ignore 143
local sfmt, sub, match = string.format, string.sub, string.match
local co_running = coroutine.running
-- the status Lua itself keeps (OpenResty's coroutine.status reads the
-- bookkeeping of the coroutine's request, freed when the request ends)
local co_status = rawget(coroutine, "_status") or coroutine.status

-- (the core's forget and close: what a tiered group's own methods use)
local acquire, encode, decode, now, quote, core_count, c_forget, c_close =
      core.acquire, core.encode, core.decode, core.now, core.quote, core.count,
      core.methods.forget, core.methods.close
local ARGS, ARGS_DEEPER = core.CHECK, core.CHECK + core.DEEPER -- acquire's checks
local protect = runner.protect
-- a tiered group's call is the ordinary call of this state, its fn the
-- tier's step
local call, rerun, after, c_stats = flow.call, flow.rerun, flow.after, flow.stats
local new_panic, is_panic, safe_tostring = panic.new, panic.is_panic, panic.safe_tostring
local resolve, cannot_wait = backends.resolve, backends.cannot_wait
local cannot_wait_msg, opts_of = flights.cannot_wait_msg, flow.opts_of
local TIMEOUT = flow.TIMEOUT
local ngx_sleep, ngx_log, ngx_now, WARN = ngx.sleep, ngx.log, ngx.now, ngx.WARN

local DONE = core.ST.DONE

-- Seconds. A lock lives LEASE past its last renewal; renewals come every
-- RENEW, so a worker whose event loop stalls for LEASE - RENEW loses its
-- leads. A watcher notices a dead leader's lock run out at once.
local LEASE, RENEW = 0.9, 0.15
-- A lead younger than YOUNG (ngx.now()) needs no renewal yet: its lease
-- lasts past the next round. The renewals' timer lives LINGER seconds past
-- the last lead.
local YOUNG, LINGER = LEASE - 3 * RENEW, 1
-- the poller's beat (see poll): from POLL_MIN to POLL_MAX, POLL_SHARE of
-- the time nothing moved
local POLL_MIN, POLL_MAX, POLL_SHARE = 0.001, 0.05, 0.02
local CHECK = 0.25           -- a watcher looks for itself at least this often
local STALE = 4 * CHECK      -- a watcher not back by then went away
local WATCH_TTL = 3 * LEASE  -- a watchers' count, renewed by the leader
local GEN_TTL = 2 * LEASE    -- a generation, renewed by every leader of its key
local RESULT_TTL = 5         -- a result nobody came back for
local LOG_EVERY = 60
local CLOSED = 2 ^ 30
local SEQ = "s"              -- the dict's change count
local SEQ_TTL = 5
local MAX_RAW = 240          -- longer bases are hashed
local REFRESH_AT = 0.8       -- of max_age: see watch

-- step()'s answers that are not results (never a user's value)
local RETRY = setmetatable({}, { __name = "singleflight.shm.retry" })
local FAILED = setmetatable({}, { __name = "singleflight.shm.failed" })

-- result flags in the dict
-- (F_PAYLOAD: the core's copier; F_CODEC: the group's codec)
local F_PAYLOAD, F_UNCROSSABLE, F_NO_ROOM, F_CODEC = 0, 1, 2, 3

local M = {}

-- handle -> its tier: { dict, name, ns, opts, codec, book, counts, current }
local tiers = setmetatable({}, { __mode = "k" })
-- "<dict>\0<name>" -> a named group's book in this worker: its counts, and
-- what of them is in the dict's counters (pushed)
local books = {}
local counter_key, publish -- (below)

---------------------------------------------------------------------------
-- Tokens: this worker's, unique in the instance

local wid, seq = nil, 0 -- "pid.born." of this worker, made in it
local wid_pid

local function new_token()
  local pid = ngx.worker.pid()
  if pid ~= wid_pid then -- first use in this worker (or a fork of it)
    wid_pid = pid
    wid = sfmt("%d.%x.", pid, (ngx.now() * 1000) % 0x100000000)
    seq = 0
  end
  seq = seq + 1
  return wid .. seq
end

local function token_of(val)
  return match(val, "^[^#]+")
end

local function own(val)
  return wid ~= nil and wid_pid == ngx.worker.pid() and sub(val, 1, #wid) == wid
end

-- Tells the pollers of every worker that a lock of dict changed. The
-- count lives SEQ_TTL seconds; made again, it starts from a value of the
-- clock, unlike any it had, so that a poller sees the change.
local function bump(dict)
  if not dict:incr(SEQ, 1) then
    dict:safe_add(SEQ, (now() * 1e6) % 2 ^ 40, SEQ_TTL)
    dict:incr(SEQ, 1)
  end
end

---------------------------------------------------------------------------
-- A full dict: this worker alone, logged at most once a minute per dict

local last_log = {}

local function degraded(t, why)
  t.counts.fallbacks = t.counts.fallbacks + 1
  local at = now()
  local last = last_log[t.name]
  if not last or at - last >= LOG_EVERY then
    last_log[t.name] = at
    ngx_log(WARN, "singleflight: lua_shared_dict \"", t.name, "\": ", tostring(why),
            "; calls fall back to deduplication in each worker (",
            t.counts.fallbacks, " so far in this worker; logged at most once a minute)")
  end
end

---------------------------------------------------------------------------
-- Leads of this worker and their renewal

-- token -> { token, dict, lkey, val, pkey, wkey, gkey, main, since, expires|nil }
local leading = {}
-- token -> the leader's coroutine, held weakly, so that one that nginx let
-- go of (a killed light thread) can be collected
local leaders = setmetatable({}, { __mode = "v" })
local renewing = false
local anchored = core.anchored

-- Its frame marks a live lead: the timer looks for it on the leader's
-- coroutine (nginx kills the coroutines of requests that go away without
-- a trace, and hands them to later requests). Not a tail call.
local function lead_frame(rec, fn, ...) -- luacheck: ignore 212
  local ok, v, err = protect(fn, ...)
  return ok, v, err
end

-- The fleet step's frame (the redis option): the lead holds from its first
-- Redis command to its last, waiting on another instance included, not
-- only while fn runs. Not a tail call.
local function fleet_frame(rec, fleet, skey, produce, opts) -- luacheck: ignore 212
  local bytes, how, shared = fleet:outcome(skey, produce, opts)
  return bytes, how, shared
end

local LEAD_FRAMES = { [lead_frame] = true, [fleet_frame] = true }

-- Is rec's lead still running: a lead frame holding rec on its coroutine
-- (singleflight.liveness)?
local function live(rec)
  if rec.main then
    return true -- the main thread: nothing to go by
  end
  local co = leaders[rec.token]
  if co == nil then
    return false -- collected
  end
  local running = co == co_running()
  if not running then
    local status = co_status(co)
    if status == "dead" or anchored(co) == false then -- nginx let it go
      return false
    elseif status == "normal" then -- it resumed another coroutine
      return true
    end
  end
  return liveness.holds(co, LEAD_FRAMES, rec)
end

-- One round of renewals.
local function renew()
  local swept, at = false, ngx_now()
  for token, rec in pairs(leading) do
    local dict = rec.dict
    if not live(rec) then -- its request went away: let the others take over
      if not swept then -- this worker's waiters first: they take over too
        swept = true
        pcall(liveness.sweep)
      end
      leading[token], leaders[token] = nil, nil
      if dict:get(rec.lkey) == rec.val then
        dict:delete(rec.lkey)
        bump(dict)
      end
    else
      local ttl = LEASE
      if rec.expires then
        local left = rec.expires - now()
        if left < ttl then
          ttl = left
        end
      end
      if ttl < 0.001 or dict:get(rec.lkey) ~= rec.val then
        -- max_age: the lock runs out by itself; or lost
        leading[token], leaders[token] = nil, nil
      elseif at - rec.since >= YOUNG then -- (a younger lead's lease lasts)
        dict:expire(rec.lkey, ttl)
        dict:expire(rec.pkey, WATCH_TTL)
        dict:expire(rec.wkey, WATCH_TTL)
        if rec.gkey then
          dict:expire(rec.gkey, GEN_TTL)
        end
      end
    end
  end
end

local renew_warned = false

-- The renewals: one light thread per worker (a timer) while it leads, and
-- for LINGER seconds after its last lead (so that short leads, one after
-- the other, do not start a timer each). It goes on through a graceful
-- shutdown (a reload): a lead that finishes there keeps its lease to the
-- end.
local last_lead = 0

local function renewals()
  while next(leading) or now() - last_lead < LINGER and not ngx.worker.exiting() do
    ngx_sleep(RENEW)
    renew()
  end
end

local function renewer()
  local ok, e = pcall(renewals)
  renewing = false
  if not ok and not renew_warned then -- the next lead starts it again
    renew_warned = true
    ngx_log(WARN, "singleflight: renewing shm leases failed: ", tostring(e))
  end
end

local timer_warned = false

local function schedule()
  last_lead = now()
  if renewing then
    return
  end
  local ok, started, err = pcall(ngx.timer.at, 0, renewer)
  if ok and started then
    renewing = true
  elseif not timer_warned then
    timer_warned = true
    ngx_log(WARN, "singleflight: cannot start the timer that renews shm leases (",
            tostring(ok and err or started), "): a leader running longer than ",
            LEASE, " s may be run again by another worker")
  end
end

---------------------------------------------------------------------------
-- The leader

local function crossed_panic(value, tb, skey)
  local p = new_panic(value, tb, skey)
  p.crossed = true -- flow.after raises it as it is
  return p
end

-- The outcome as the dict holds it: a value and its flags. A result goes
-- through the group's codec (singleflight.codec), once; a panic, or a
-- result the codec leaves to it, through the core's copier. A codec that
-- fails makes the result one that cannot cross (the reason in its place).
local function packed(t, ok, v, err)
  local payload, bad
  if ok then
    local enc = t.codec.encode
    if enc then
      local fine, bytes = pcall(enc, v, err)
      if not fine then
        return "the codec's encode failed: " .. safe_tostring(bytes), F_UNCROSSABLE
      elseif bytes ~= nil then
        return bytes, F_CODEC
      end
    end
    payload, bad = encode(true, v, err)
  else
    local value = v.value
    if not encode(true, value) then -- it crosses as its text
      value = safe_tostring(value)
    end
    payload, bad = encode(false, value, v.traceback)
  end
  if payload then
    return payload, F_PAYLOAD
  end
  return bad, F_UNCROSSABLE
end

-- Across a fleet (the redis option), the outcome travels as one string:
-- "P" and the copier's payload, "C" and the codec's, or "U" and why it
-- could not cross.
local FLEET_KIND = { [F_PAYLOAD] = "P", [F_CODEC] = "C", [F_UNCROSSABLE] = "U" }

local function fleet_bytes(t, ok, v, err)
  local value, flags = packed(t, ok, v, err)
  return FLEET_KIND[flags] .. value
end

-- What another instance's outcome gives here: ok, v, err as fn would, or
-- false and the panic.
local function from_fleet(t, bytes, skey)
  local kind, rest = sub(bytes, 1, 1), sub(bytes, 2)
  if kind == "U" then
    return false, sfmt("singleflight: result for key %s cannot cross instances (%s)",
                       quote(skey), rest)
  elseif kind == "C" then
    local dec = t.codec.decode
    local fine, v, err = pcall(dec or error, rest)
    if not fine then
      return false, sfmt("singleflight: result for key %s cannot cross instances (the "
                         .. "codec's decode failed: %s)", quote(skey),
                         dec and safe_tostring(v) or "this group's codec is the copier")
    end
    return true, v, err
  end
  local okd, ok, a, b = pcall(decode, rest)
  if not okd then
    return false, "singleflight: corrupt result from another instance for key "
                  .. quote(skey)
  end
  if ok then
    return true, a, b
  end
  return false, crossed_panic(a, b, skey)
end

-- Moves a key (gkey: "g" .. its base) to its next generation: its later
-- callers start a new execution, those waiting on the running one still
-- get its result.
local function next_generation(t, gkey)
  local dict = t.dict
  local n, err = dict:incr(gkey, 1)
  if not n then
    local ok
    ok, err = dict:safe_add(gkey, 0, GEN_TTL)
    if ok or err == "exists" then
      n, err = dict:incr(gkey, 1)
    end
  end
  if not n then
    degraded(t, err)
  else
    dict:expire(gkey, GEN_TTL)
  end
end

-- Runs fn for the instance: itself, or, with a fleet, as the fleet's one
-- execution of the key (another instance's outcome, decoded, when it led).
-- A wait on another instance ends at the caller's deadline: RETRY (the
-- caller times out), or with on_timeout = "run", fn runs here. A forget
-- of the execution anywhere in the fleet moves the key to its next
-- generation here too.
local function run_lead(t, rec, ctx, fn, ...)
  local fleet = t.fleet
  if not fleet then
    return lead_frame(rec, fn, ...)
  end
  local skey, dict = ctx.skey, t.dict
  local ran, ok, v, err = false, nil, nil, nil
  local n, args = select("#", ...), { ... }
  local bytes, how, shared = fleet_frame(rec, fleet, skey, function()
    ran = true
    ok, v, err = lead_frame(rec, fn, unpack(args, 1, n))
    if not ok and not is_panic(v) then -- the handler failed: a bare value
      v = new_panic(v)
    end
    return fleet_bytes(t, ok, v, err)
  end, {
    wait = ctx.deadline and (ctx.deadline > now() and ctx.deadline - now() or 0),
    forgotten = function()
      local gkey = "g" .. ctx.base
      if dict:get("l" .. (dict:get(gkey) or 0) .. ":" .. ctx.base) == rec.val then
        next_generation(t, gkey)
      end
    end,
  })
  local counts = t.counts
  counts["fleet_" .. how] = counts["fleet_" .. how] + 1
  ctx.fleet_shared = shared
  if ran then
    return ok, v, err
  elseif how == "timeout" and t.opts.on_timeout == "run" then
    return lead_frame(rec, fn, unpack(args, 1, n))
  end
  counts.fnruns = counts.fnruns - 1 -- another instance ran it, or none did
  if how == "timeout" then
    return RETRY
  end
  ctx.ran = false -- another caller's outcome
  return from_fleet(t, bytes, skey)
end

local function store(t, rkey, value, flags)
  local ok, why = t.dict:safe_set(rkey, value, RESULT_TTL, flags)
  if not ok then -- the watchers run fn themselves
    degraded(t, why)
    t.dict:safe_set(rkey, "", RESULT_TTL, F_NO_ROOM)
  end
end

-- Closes the watchers' count wkey: true if a watcher counted itself in
-- (its result is then due).
local function close(dict, wkey)
  local n = dict:incr(wkey, CLOSED)
  if not n then
    return false
  elseif n >= 2 * CLOSED then -- closed already (by its own leader)
    dict:incr(wkey, -CLOSED)
    return false
  elseif n > CLOSED then
    dict:expire(wkey, RESULT_TTL)
    return true
  end
  dict:delete(wkey)
  return false
end

--[[
Runs fn as the instance's leader of ctx's key, under the lock lkey that
holds val; publishes the outcome if a watcher counted itself in.

p<gen>:<base> names the last execution that took the lock. If it went
away without a result (its worker died, its request went away, max_age),
this one is its successor: the watchers still counted in there get this
one's result too, whenever they come back to look.
]]
local function lead(t, ctx, lkey, pkey, val, token, gkey, fn, ...)
  local dict, expires = t.dict, nil
  if t.opts.max_age then
    expires = now() + t.opts.max_age
  end
  local prev = dict:get(pkey)
  dict:safe_set(pkey, token, WATCH_TTL) -- no room: no successor, that's all
  local co = co_running()
  local rec = { token = token, dict = dict, lkey = lkey, pkey = pkey, val = val,
                wkey = "w" .. token, gkey = gkey, main = co == nil, since = ngx_now(),
                expires = expires }
  leading[token], leaders[token] = rec, co
  schedule()
  local counts = t.counts
  counts.leads, counts.fnruns = counts.leads + 1, counts.fnruns + 1
  if prev then
    counts.takeovers = counts.takeovers + 1
  end
  ctx.ran = true
  local ok, v, err = run_lead(t, rec, ctx, fn, ...)
  -- a lead younger than YOUNG holds its lock still, if the renewals did not
  -- let it go: no need to look
  local young = leading[token] == rec and not expires and ngx_now() - rec.since < YOUNG
  leading[token], leaders[token] = nil, nil
  if ok == RETRY then -- it timed out waiting on another instance: no outcome
    if dict:get(lkey) == val then
      dict:delete(lkey)
      bump(dict)
    end
    ctx.timed_out = true
    return RETRY
  end
  if not ok and not is_panic(v) then -- the handler failed: a bare value
    v = new_panic(v)
  end
  local shared = false
  -- still ours? (else max_age or a lost lease: the result is ours alone)
  if young or dict:get(lkey) == val then
    local mine = close(dict, rec.wkey)
    local theirs = prev ~= nil and close(dict, "w" .. prev)
    if mine or theirs then
      shared = true
      local value, flags = packed(t, ok, v, err)
      if mine then
        store(t, "r" .. token, value, flags)
      end
      if theirs then
        store(t, "r" .. prev, value, flags)
      end
    end
    dict:delete(lkey)
    if dict:get(pkey) == token then
      dict:delete(pkey)
    end
    bump(dict)
  elseif expires and now() >= expires then
    -- max_age handed the key to a successor, which still runs: this
    -- outcome, first to arrive, answers the successor's watchers (the
    -- successor finds them answered, and keeps its own for its worker's
    -- callers), as nginx's proxy_cache_lock_age serves every waiter with
    -- the first response
    local cur = dict:get(lkey)
    local succ = cur and token_of(cur)
    if succ and succ ~= token and close(dict, "w" .. succ) then
      shared = true
      store(t, "r" .. succ, packed(t, ok, v, err))
      bump(dict)
    end
  end
  ctx.shared = shared or ctx.fleet_shared == true
  if not ok then
    v.crossed, v.key = true, ctx.skey
    error(v, 0)
  end
  return v, err
end

---------------------------------------------------------------------------
-- The watcher

local RESTART, LOCAL, TIMED_OUT, REFRESH = {}, {}, {}, {}

-- Was the execution watched under wkey answered before its end (by a
-- predecessor that max_age had replaced: see lead)?
local function answered(dict, wkey)
  return (dict:get(wkey) or 0) > CLOSED
end

-- The watcher leaves w<token>; the last reader of a result deletes it.
local function leave(dict, wkey, rkey, moved)
  local m = dict:incr(wkey, -1)
  if m == CLOSED then
    dict:delete(rkey)
    dict:delete(wkey)
  elseif m == 0 and moved then -- a leader that went away: nobody to close it
    dict:delete(wkey)
  end
end

-- What a watcher read under r<token>.
local function outcome(t, ctx, r, flags)
  if flags == F_UNCROSSABLE then
    return FAILED, sfmt("singleflight: result for key %s cannot cross nginx workers (%s)",
                        quote(ctx.skey), r)
  elseif flags == F_NO_ROOM then
    return LOCAL
  elseif flags == F_CODEC then
    local dec = t.codec.decode
    local fine, v, err = pcall(dec or error, r)
    if not fine then -- (no decode: another worker's group has a codec, this one none)
      return FAILED, sfmt("singleflight: result for key %s cannot cross nginx workers "
                          .. "(the codec's decode failed: %s)", quote(ctx.skey),
                          dec and safe_tostring(v) or "this group's codec is the copier")
    end
    ctx.shared = true
    return v, err
  end
  local fine, ok, a, b = pcall(decode, r)
  if not fine then
    return FAILED, sfmt("singleflight: result for key %s: %s", quote(ctx.skey), tostring(ok))
  end
  ctx.shared = true
  if ok then
    return a, b
  end
  t.counts.remote_panics = t.counts.remote_panics + 1
  error(crossed_panic(a, b, ctx.skey), 0)
end

-- A watcher's count in w<token>, kept after its leader went away without
-- a result, until the watcher leads (the new leader's result is due to
-- that token's watchers too) or counts itself in elsewhere.
local function drop(dict, held)
  if held then
    leave(dict, "w" .. held, "r" .. held, true)
  end
end

---------------------------------------------------------------------------
-- The poller: one light thread per worker, while anybody watches. It
-- reads the dict's change count (bumped by every leader that ends), and
-- when it moved, wakes the watchers whose lock changed. It looks again
-- after 2 % of the time since the count last moved or a watcher came
-- (POLL_SHARE), at least POLL_MIN and at most POLL_MAX seconds: a call of
-- 100 ms is answered within 2 ms of its end, and one of 10 s costs its
-- watching workers some 40 looks a second, answered within 50 ms.
-- A watcher also wakes by itself when its lock's lease would run out (a
-- dead leader) and every CHECK seconds.

local new_sema
local watchers, nwatchers, polling = {}, 0, false
local seen = setmetatable({}, { __mode = "k" }) -- dict -> its last count

local quiet_since = 0 -- when the count last moved, or a watcher came
local poke, napping -- the poller's pause: a new watcher ends a long one

local function poll()
  local moved = {}
  quiet_since = now()
  if not poke then
    poke = require("ngx.semaphore").new(0)
  end
  while nwatchers > 0 do
    local at, any = now(), false
    for d in pairs(moved) do
      moved[d] = nil
    end
    for w in pairs(watchers) do
      local d = w.dict
      local m = moved[d]
      if m == nil then
        local n = d:get(SEQ)
        m = n ~= seen[d]
        seen[d], moved[d] = n, m
        any = any or m
      end
      if at - w.touched > STALE then -- its coroutine went away
        watchers[w] = nil
        nwatchers = nwatchers - 1
      elseif m and not w.woken and (d:get(w.lkey) ~= w.val or answered(d, w.wkey)) then
        w.woken = true
        w.sema:post(1)
      end
    end
    if any then
      quiet_since = at
    end
    local pause = (at - quiet_since) * POLL_SHARE
    if pause <= POLL_MIN then
      ngx_sleep(POLL_MIN)
    else
      napping = true
      poke:wait(pause > POLL_MAX and POLL_MAX or pause)
      napping = false
    end
  end
end

local function poller(premature)
  if not premature then
    pcall(poll) -- (watchers wake on their own meanwhile; the next starts it)
  end
  polling = false
end

local function enlist_watcher(w)
  watchers[w] = true
  nwatchers = nwatchers + 1
  quiet_since = now() -- a new call: look often again
  if napping and poke:count() < 1 then
    poke:post(1)
  end
  if not polling then
    local ok, started = pcall(ngx.timer.at, 0, poller)
    polling = ok and started and true or false
  end
end

local function drop_watcher(w)
  if watchers[w] then
    watchers[w] = nil
    nwatchers = nwatchers - 1
  end
end

--[[
Waits for the execution whose lock lkey holds val (led elsewhere), as one
watcher of it; held: the token of an earlier execution this watcher is
still counted in (left once counted in here). Returns the result, or
RESTART and the token still held (the leader went away without a result),
LOCAL (the dict is full: fn runs here), TIMED_OUT, or REFRESH: with
max_age, this worker's call, which only watches, is about to look too old
to its local waiters (they would take over): it ends, and they call again.
]]
local function watch(t, ctx, lkey, val, held)
  local dict = t.dict
  local token = token_of(val)
  local wkey, rkey = "w" .. token, "r" .. token
  local n = dict:incr(wkey, 1)
  if not n then
    local ok, err = dict:safe_add(wkey, 0, WATCH_TTL)
    if not ok and err ~= "exists" then
      drop(dict, held)
      degraded(t, err)
      return LOCAL
    end
    n = dict:incr(wkey, 1)
    if not n then
      return RESTART, held
    end
  end
  drop(dict, held)
  t.counts.waits = t.counts.waits + 1
  if not new_sema then
    new_sema = require("ngx.semaphore").new
  end
  local w = { dict = dict, lkey = lkey, val = val, wkey = wkey, sema = new_sema(0),
              woken = false, touched = now() }
  enlist_watcher(w)
  local deadline, refresh = ctx.deadline, ctx.refresh
  local st, cur
  while true do
    cur = dict:get(lkey)
    if cur ~= val or n > CLOSED or answered(dict, wkey) then
      break
    end
    local at = now()
    local pause = CHECK
    if not polling then -- no timer for the poller: on its own, then
      pause = POLL_MAX
    end
    local ttl = dict:ttl(lkey)
    if ttl and ttl > 0 and ttl + 0.001 < pause then
      pause = ttl + 0.001
    end
    if deadline then
      if at >= deadline then
        st = TIMED_OUT
        break
      elseif deadline - at < pause then
        pause = deadline - at
      end
    end
    if refresh then
      if at >= refresh then
        st = REFRESH
        break
      elseif refresh - at < pause then
        pause = refresh - at
      end
    end
    w.woken, w.touched = false, at
    w.sema:wait(pause)
  end
  drop_watcher(w)
  if st then
    leave(dict, wkey, rkey, false)
    return st
  end
  local r, flags = dict:get(rkey)
  if r ~= nil then
    leave(dict, wkey, rkey, cur ~= val)
    return outcome(t, ctx, r, flags)
  elseif n > CLOSED then -- counted in too late: a later caller
    leave(dict, wkey, rkey, cur ~= val)
    return RESTART
  end
  return RESTART, token -- the leader went away
end

---------------------------------------------------------------------------
-- step: the first caller of a key in this worker, for all of them

local function lease_ttl(t)
  local max_age = t.opts.max_age
  if max_age and max_age < LEASE then
    return max_age > 0.001 and max_age or 0.001
  end
  return LEASE
end

-- fn, run by step for this worker's callers only
local function run_here(t, ctx, fn, ...)
  t.counts.fnruns = t.counts.fnruns + 1
  ctx.ran = true
  return fn(...)
end

-- A caller past its deadline: with on_timeout = "run" it runs fn itself.
local function timed_out(t, ctx, self, fn, ...)
  core_count(self, "timeouts")
  if t.opts.on_timeout == "run" then
    return run_here(t, ctx, fn, ...)
  end
  ctx.timed_out = true
  return RETRY
end

-- Lets go of the lock lkey (it holds val, a lead of this worker that went
-- away or ran past max_age): the next to add it succeeds that lead.
local function let_go(dict, lkey, val)
  local token = token_of(val)
  leading[token], leaders[token] = nil, nil
  if dict:get(lkey) == val then
    dict:delete(lkey)
    bump(dict)
  end
end

-- step, when the lock lkey holds val, another's lead: watches it (or, for a
-- caller that cannot wait, does what its options say). Returns step's
-- answer, or RESTART and the token still held, or TIMED_OUT.
local function another(self, t, ctx, late, lkey, val, held, fn, ...)
  local dict, check = t.dict, ctx.check
  if check ~= "" and sub(val, -#check) ~= check then
    drop(dict, held)
    degraded(t, "two keys share a hash") -- this worker alone, then
    return run_here(t, ctx, fn, ...)
  end
  local why = not late and cannot_wait(t.be or resolve(t.opts.backend))
  if late or why then
    drop(dict, held)
    if late or t.opts.timeout == 0 then
      return timed_out(t, ctx, self, fn, ...)
    end
    return FAILED, cannot_wait_msg(ctx.skey, why)
  end
  local a, b = watch(t, ctx, lkey, val, held)
  if a == LOCAL then
    return run_here(t, ctx, fn, ...)
  elseif a == REFRESH then
    return RETRY
  end
  return a, b
end

local function step(self, t, ctx, fn, ...)
  local counts = t.counts
  counts.steps = counts.steps + 1
  local late = ctx.deadline and now() >= ctx.deadline
  if late and t.opts.on_timeout == "run" and t.opts.timeout > 0 then
    -- a local waiter that gave up (the flow runs it unshared), or a
    -- take-over past the deadline: fn, for this worker (with timeout = 0,
    -- a caller that finds the key free still leads for the instance)
    return run_here(t, ctx, fn, ...)
  end
  local dict, base, check = t.dict, ctx.base, ctx.check
  local gkey = "g" .. base
  local held -- the token of a leader that went away, still counted in
  local max_age = t.opts.max_age
  ctx.refresh = max_age and now() + REFRESH_AT * max_age
  while true do
    local gen = dict:get(gkey) or 0
    ctx.gen = gen
    t.current[ctx.skey] = ctx
    local lkey = "l" .. gen .. ":" .. base
    -- the common case first: nobody leads the key, and this caller does
    local token = new_token()
    local mine = token .. check
    local ok, err = dict:safe_add(lkey, mine, lease_ttl(t))
    local val
    if ok then
      if gen == 0 or dict:expire(gkey, GEN_TTL) then
        drop(dict, held) -- this lead succeeds that one (see lead)
        -- gkey: renewed with the lock while it is there (a forget may
        -- come while this runs: it then holds as long as this can be joined)
        return lead(t, ctx, lkey, "p" .. gen .. ":" .. base, mine, token, gkey, fn, ...)
      end
      dict:delete(lkey) -- the generation ran out meanwhile: start again
    elseif err ~= "exists" then
      drop(dict, held)
      degraded(t, err)
      return run_here(t, ctx, fn, ...)
    else
      val = dict:get(lkey) -- nil: it went meanwhile (again, then)
    end
    local here = val ~= nil and own(val)
    local rec = here and leading[token_of(val)]
    if here and (not rec or not live(rec) or (rec.expires and now() >= rec.expires)) then
      -- a lead of this worker whose request went away, or past max_age
      let_go(dict, lkey, val)
    elseif rec and leaders[rec.token] == co_running() then
      drop(dict, held)
      return FAILED, "singleflight: recursive call for key " .. quote(ctx.skey)
    elseif val ~= nil then
      local a, b = another(self, t, ctx, late, lkey, val, held, fn, ...)
      if a == RESTART then -- the leader went away without a result
        held = b
      elseif a == TIMED_OUT then
        held, late = nil, true
      else
        return a, b
      end
    end
  end
end

---------------------------------------------------------------------------
-- Counters for the whole instance: each worker adds what its callers did
-- to counters in the dict (incr), one entry per counter and group. They
-- are counters, not in-flight state: they have no expiry, and live as
-- long as the dict (a reload keeps them). A group's keys are its counters'
-- too: groups made with new over one dict share both; a named group has
-- its own.

local COUNTERS = { "calls", "executions", "shared", "panics", "timeouts", "abandoned",
                   "forgotten", "leads", "waits", "takeovers", "fallbacks" }
local ALL_COUNTERS = { "calls", "executions", "shared", "panics", "timeouts", "abandoned",
                       "forgotten", "leads", "waits", "takeovers", "fallbacks",
                       "fleet_leads", "fleet_waits", "fleet_fallbacks", "fleet_timeouts" }

function counter_key(t, name)
  return "c" .. name .. ":" .. t.ns
end

-- The counters of this worker's callers (for the group: named groups'
-- handles share them in a worker, as they share the core's).
local function worker_stats(self, t)
  local st = c_stats(self)
  local c = t.counts
  -- each step counted as an execution; fn ran fnruns times
  st.executions = st.executions - c.steps + c.fnruns
  st.shared = c.dups
  st.panics = st.panics - c.remote_panics
  -- a forget counts once, in the worker that forgot
  st.forgotten = st.forgotten - c.forgets_seen + c.forgets_there
  st.leads, st.waits, st.takeovers, st.fallbacks =
    c.leads, c.waits, c.takeovers, c.fallbacks
  st.fleet_leads, st.fleet_waits, st.fleet_fallbacks, st.fleet_timeouts =
    c.fleet_led, c.fleet_waited, c.fleet_fallback, c.fleet_timeout
  st.timeouts = st.timeouts + c.fleet_timeout
  return st
end

-- Adds this worker's counts since the last time to the dict's counters
-- (safe_add: never evicts; a full dict keeps them here until there is
-- room). Returns this worker's counters.
function publish(self, t)
  local st = worker_stats(self, t)
  local dict, pushed = t.dict, t.book.pushed
  for _, name in ipairs(ALL_COUNTERS) do
    local d = st[name] - (pushed[name] or 0)
    if d ~= 0 then
      local key = counter_key(t, name)
      local n = dict:incr(key, d)
      if not n then
        local ok, err = dict:safe_add(key, 0)
        n = (ok or err == "exists") and dict:incr(key, d)
      end
      if n then
        pushed[name] = st[name]
      end
    end
  end
  return st
end

---------------------------------------------------------------------------
-- g:call on a tiered group (flow.call hands it over here)

local function base_of(t, skey)
  local base = t.ns .. skey
  if #base > MAX_RAW then
    return "#" .. ngx.sha1_bin(base), "#" .. ngx.md5_bin(base)
  end
  return base, ""
end

-- The key as the core keeps it (a number's text), the arguments checked
-- as call checks them: errors blame the caller of fname, the function
-- that calls this. (A method that checks its own arguments, acquire with
-- ARGS, blames its caller.)
local function normal_key(self, key, fn, fname)
  local _, _, _, skey = acquire(self, key, fn, fname, ARGS_DEEPER)
  return skey
end

-- g:call in this worker again (not counted), after a watcher gave up
local function recall(self, skey, ...)
  local st, a, b, c, d = rerun(self, skey, step, ...)
  if st == DONE then
    return a, b, c
  end
  return after(self, skey, step, rerun, st, a, b, c, d, ...)
end

local function tiered(self, key, fn, ...)
  local t, skey = tiers[self], key
  if t == nil or type(key) ~= "string" or type(fn) ~= "function" then
    -- the key as the core keeps it, or call's error (the common case, a
    -- string key and a function on a tiered group, needs no crossing)
    skey = select(4, acquire(self, key, fn, "call", ARGS))
    if t == nil then -- a group, but another kind (g.call of one, on this)
      error("bad argument #1 to 'call' (a group with the shm option expected)", 2)
    end
  end
  local base, check = base_of(t, skey)
  local cur = t.current[skey]
  if cur and cur.gen ~= (t.dict:get("g" .. base) or 0) then
    -- forgotten in another worker: this worker's callers start afresh too
    -- (counted where it was forgotten, not here)
    if c_forget(self, skey) then
      t.counts.forgets_seen = t.counts.forgets_seen + 1
    end
    t.current[skey] = nil
  end
  local timeout = t.opts.timeout
  local ctx = { skey = skey, base = base, check = check,
                deadline = timeout and now() + timeout }
  local ok, v, err, shared = pcall(call, self, skey, step, self, t, ctx, fn, ...)
  while ok and v == RETRY and not ctx.timed_out do
    -- the watcher of this worker gave up or made way: the callers left go on
    ok, v, err, shared = pcall(recall, self, skey, self, t, ctx, fn, ...)
  end
  if t.current[skey] == ctx then
    t.current[skey] = nil
  end
  if ok and v == RETRY then
    return nil, TIMEOUT, false
  end
  shared = ok and (shared or ctx.shared) or false
  if not ctx.ran and (shared or v == FAILED or not ok and is_panic(v)) then
    t.counts.dups = t.counts.dups + 1 -- another caller's outcome
  end
  publish(self, t)
  if not ok then
    error(v, 0)
  elseif v == FAILED then
    error(err, 0)
  end
  return v, err, shared
end

---------------------------------------------------------------------------
-- g:forget, g:stats, g:start on tiered groups

local function noop() end

local function forget(self, key)
  local t = tiers[self]
  if t == nil then -- closed: the core's forget says so
    return c_forget(self, key)
  end
  local was = c_forget(self, key)
  local skey = normal_key(self, key, noop, "forget")
  local base = base_of(t, skey)
  t.current[skey] = nil
  local dict, gkey = t.dict, "g" .. base
  local here = dict:get("l" .. (dict:get(gkey) or 0) .. ":" .. base) ~= nil
  if here then
    next_generation(t, gkey)
  end
  local there = t.fleet ~= nil and t.fleet:forget(skey) == true -- every instance
  if not was and (here or there) then -- in flight elsewhere only: one forget
    t.counts.forgets_there = t.counts.forgets_there + 1
  end
  publish(self, t)
  return was or here or there
end

local function stats(self)
  local t = tiers[self]
  if t == nil then -- closed: the core's stats says so
    return c_stats(self)
  end
  local mine = publish(self, t)
  -- the instance's counters: every worker's, pushed to the dict (and what
  -- this worker could not push yet: the dict was full)
  local st, dict, pushed = { inflight = mine.inflight }, t.dict, t.book.pushed
  for _, name in ipairs(t.fleet and ALL_COUNTERS or COUNTERS) do
    st[name] = (dict:get(counter_key(t, name)) or 0) + mine[name] - (pushed[name] or 0)
  end
  return st
end

-- g:start: a light thread that runs g:call, and a future on it
local Future = { __name = "singleflight.Future" }
Future.__index = Future

local function check_future(f, fname)
  if getmetatable(f) ~= Future then
    error(sfmt("bad argument #1 to '%s' (singleflight.Future expected, got %s)",
               fname, type(f)), 3)
  end
end

local function settle(f, ok, v, err, shared)
  f.done = true
  if ok then
    f.v, f.err, f.shared = v, err, shared
  elseif is_panic(v) and is_panic(v.value) then
    f.panic = v.value -- the panic call raised
  else
    f.failure = is_panic(v) and v.value or v -- a misuse, raised as it is
  end
  f.args = nil
  if f.waiting > 0 then
    pcall(f.be.wake, f.obj, f.waiting)
  end
end

local tiered_call -- (below)

local function run_future(f)
  settle(f, protect(tiered_call, f.group, f.key, f.fn, unpack(f.args, 1, f.n)))
end

function Future:wait(timeout)
  check_future(self, "wait")
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout or timeout < 0) then
    error(sfmt("bad argument #1 to 'wait' (non-negative number expected, got %s)",
               type(timeout) == "number" and tostring(timeout) or type(timeout)), 2)
  end
  if not self.done then
    local be = self.be
    local why = cannot_wait(be)
    if why then
      error(cannot_wait_msg(self.key, why), 2)
    end
    local deadline = timeout and now() + timeout
    while not self.done do
      local left
      if deadline then
        left = deadline - now()
        if left <= 0 then
          return nil, TIMEOUT, false
        end
      end
      self.waiting = self.waiting + 1
      local ok, e = pcall(be.wait, self.obj, left)
      self.waiting = self.waiting - 1
      if not ok then
        error(e, 0)
      end
    end
  end
  if self.failure ~= nil then
    error(self.failure, 0)
  elseif self.panic ~= nil then
    error(self.panic, 0)
  end
  return self.v, self.err, self.shared
end

function Future:ready()
  check_future(self, "ready")
  return self.done
end

function Future:__tostring()
  return sfmt("singleflight.Future %s (%s)", quote(self.key),
              self.done and "ready" or "pending")
end

local function start(self, detached, fname, key, fn, ...)
  local _, _, _, skey = acquire(self, key, fn, fname, ARGS) -- (tail-called)
  local be = resolve((opts_of[self] or {}).backend or "auto")
  local spawn = future.spawner(be, detached)
  if not spawn then
    error(sfmt("singleflight: start needs a backend that can spawn light threads "
               .. "(backend %q has no spawn)", tostring(be.name or "table")), 2)
  end
  local f = setmetatable({ group = self, key = skey, fn = fn, be = be,
                           obj = be.new and be.new() or true, waiting = 0,
                           done = false, n = select("#", ...), args = { ... } }, Future)
  local ok, e = protect(spawn, run_future, f)
  if not ok then
    error(sfmt("singleflight: start cannot spawn a light thread here: %s",
               tostring(is_panic(e) and e.value or e)), 2)
  end
  return f
end

---------------------------------------------------------------------------

--- Makes g (made with options o, named `name` for singleflight.group) a
-- tiered group over the lua_shared_dict o.shm.
function M.attach(g, o, name)
  local dict = ngx.shared[o.shm]
  local book = name and books[o.shm .. "\0" .. name]
  if not book then
    book = { pushed = {}, counts = {
      leads = 0, waits = 0, takeovers = 0, fallbacks = 0, steps = 0, fnruns = 0, dups = 0,
      remote_panics = 0, forgets_seen = 0, forgets_there = 0,
      fleet_led = 0, fleet_waited = 0, fleet_fallback = 0, fleet_timeout = 0 } }
    if name then
      books[o.shm .. "\0" .. name] = book
    end
  end
  tiers[g] = {
    dict = dict, name = o.shm, opts = o, codec = o.codec or codec_default(),
    -- a named group's keys are its own; groups made with new share the dict's
    ns = name and ("=" .. #name .. ":" .. name) or "-",
    be = o.backend ~= "auto" and resolve(o.backend) or nil,
    book = book, counts = book.counts,
    current = setmetatable({}, { __mode = "v" }),
    -- the group's identity across the fleet: the dict's name and its own
    fleet = o.redis and require("singleflight.redis").new(o.redis, { shm = o.shm, group = name })
            or nil,
  }
  -- the counters are made now, while there is room: counting never adds
  -- an entry later (incr on an entry there allocates nothing)
  for _, cname in ipairs(o.redis and ALL_COUNTERS or COUNTERS) do
    dict:safe_add(counter_key(tiers[g], cname), 0)
  end
  core.tier(g) -- its methods are the tier's from now on
end

-- A tiered group's methods: the binding's tiered groups have them (see
-- core.tier), no other group.
tiered_call = tiered
core.interpose("tiered", "call", tiered)
core.interpose("tiered", "do", tiered)
core.interpose("tiered", "forget", forget)
-- a closed group has no tier: its methods find none, and the core, asked
-- instead, says the group is closed
core.interpose("tiered", "close", function(self)
  local r = c_close(self)
  tiers[self] = nil
  return r
end)
core.interpose("tiered", "stats", stats)
core.interpose("tiered", "start", function(self, key, fn, ...)
  return start(self, false, "start", key, fn, ...)
end)
core.interpose("tiered", "start_detached", function(self, key, fn, ...)
  return start(self, true, "start_detached", key, fn, ...)
end)

-- For the specs.
M._leading = leading
M.LEASE = LEASE

return M
