--- singleflight.future: g:start(key, fn, ...), Go's DoChan.
--
-- start acquires the key at once, as call does: when a call is in flight
-- the future joins it as a duplicate; otherwise the future's call leads
-- from that moment (a second start, or a call, joins it) and fn runs in a
-- light thread of the backend's scheduler, which adopts the lead. A future
-- of this Lua state waits in the call's flight with its other waiters, so
-- that a leader that goes away sends it to take over, as any waiter.

local core = require "singleflight.core"
local panic = require "singleflight.panic"
local runner = require "singleflight.runner"
local backends = require "singleflight.backends"
local flow = require "singleflight.flow"
local flights = require "singleflight.flights"
local liveness = require "singleflight.liveness"

local error, getmetatable, select, setmetatable, tostring, type =
      error, getmetatable, select, setmetatable, tostring, type
local unpack = table.unpack or unpack -- luacheck: ignore 143
local sfmt = string.format

local acquire, adopt, core_wait, release, state, now, quote =
      core.acquire, core.adopt, core.wait, core.release, core.state, core.now,
      core.quote
local is_panic, new_panic = panic.is_panic, panic.new
local resolve, cannot_wait = backends.resolve, backends.cannot_wait
local flight, gone, drop_waiter, wait_flight, deliver, lead, call =
      flights.flight, flights.gone, flights.drop_waiter, flights.wait_flight,
      flights.deliver, runner.lead, flow.call
local opts_of, TIMEOUT = flow.opts_of, flow.TIMEOUT
local running = runner.running
-- future -> the light thread that runs its fn, held weakly: one that goes
-- away must stay collectable, for the future to take over
local runner_of = setmetatable({}, { __mode = "kv" })

local ST = core.ST
local LEADER, JOINED, FOREIGN, RECURSIVE, PANICKED, DELIVER, DONE_GONE, PANICKED_GONE =
      ST.LEADER, ST.JOINED, ST.FOREIGN, ST.RECURSIVE, ST.PANICKED, ST.DELIVER, ST.DONE_GONE,
      ST.PANICKED_GONE

local Future = { __name = "singleflight.Future" }
Future.__index = Future

local function check_future(f, fname)
  if getmetatable(f) ~= Future then
    error(sfmt("bad argument #1 to '%s' (singleflight.Future expected, got %s)",
               fname, type(f)), 3)
  end
end

-- The light thread of a future that leads: it adopts the call and runs fn;
-- the result reaches the future through the call's flight (the future
-- watches it: the run always has someone to deliver to).
local function lead_adopted(f, lead_ref)
  local st, a, b, c, d = lead(f.group, adopt(lead_ref), f.key, f.fn,
                              unpack(f.args, 1, f.n))
  if st == DELIVER then
    deliver(d, true, a, b, nil, c)
  elseif st == PANICKED and c then
    deliver(c, false, nil, nil, new_panic(a, b, d))
  elseif st == DONE_GONE then
    gone(d)
    flow.answer(f.group, f.key, true, a, b)
  elseif st == PANICKED_GONE then
    gone(c)
    flow.answer(f.group, f.key, false, nil, nil, new_panic(a, b, d))
  end
end

-- The leader's reference travels with the light thread alone: if the
-- thread goes away before it runs, the reference's finalizer abandons the
-- call, and the future (which holds a reference of its own) takes over.
local function body(f, lead_ref)
  runner_of[f] = running() -- (its wait from inside fn is a recursion)
  runner.protect(lead_adopted, f, lead_ref)
  runner_of[f] = nil
end

local function fulfil(f, ok, v, err, shared)
  f.done = true
  if ok then
    f.v, f.err, f.shared = v, err, shared
  else
    f.panic = v
  end
  f.args = nil
end

-- The future stops waiting on its call: out of the flight, reference let go.
local function detach(f)
  if f.fl then
    drop_waiter(f.c, f.fl)
    f.fl = nil
  end
  release(f.ref)
end

-- The call went away without a result: this waiter takes over, as any
-- waiter of the call would.
local function take_over(f)
  detach(f)
  local ok, v, err, shared = runner.protect(call, f.group, f.key, f.fn,
                                            unpack(f.args, 1, f.n))
  if not ok and is_panic(v) and not is_panic(v.value) then
    error(v.value, 0) -- not fn's panic (a misuse, a wait that can't be): as is
  end
  if not ok then
    v = v.value -- the panic call raised, unwrapped from protect's
  end
  fulfil(f, ok, v, err, shared)
end

--- Waits at most `timeout` seconds (default: no limit) for the result;
-- returns v, err, shared as call would, or raises the panic.
function Future:wait(timeout)
  check_future(self, "wait")
  liveness.watch()
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout or timeout < 0) then
    error(sfmt("bad argument #1 to 'wait' (non-negative number expected, got %s)",
               type(timeout) == "number" and tostring(timeout) or type(timeout)), 2)
  end
  if not self.done and runner_of[self] ~= nil and runner_of[self] == running() then
    error("singleflight: recursive call for key " .. quote(self.key)
          .. " (its fn waits for its own future)", 2)
  end
  if not self.done then
    if self.st == FOREIGN then
      local r, ok, a, b = core_wait(self.ref, timeout or -1, true)
      if r == "timeout" then
        return nil, TIMEOUT, false
      elseif r == "done" then
        fulfil(self, ok, a, b, true)
        if not ok then
          self.panic = new_panic(a, b, self.key)
        end
      elseif r == "error" then
        error(ok, 2)
      else
        take_over(self)
      end
    else
      local fl = self.fl
      if not fl.done and not fl.abandoned then
        local why = cannot_wait(self.backend)
        if why then
          error(flights.cannot_wait_msg(self.key, why), 2)
        end
        local opts = opts_of[self.group] or {}
        wait_flight(fl, self.backend, self.ref, self.c, self.key,
                    timeout and now() + timeout, opts.max_age)
      end
      if fl.done then
        detach(self)
        fulfil(self, fl.ok, fl.v, fl.err, self.st == JOINED or fl.shared)
        if not fl.ok then
          self.panic = fl.panic
        end
      elseif fl.abandoned then
        take_over(self)
      else
        return nil, TIMEOUT, false
      end
    end
  end
  if self.panic ~= nil then
    error(self.panic, 0)
  end
  return self.v, self.err, self.shared
end

--- True once the result is in.
function Future:ready()
  check_future(self, "ready")
  if self.done then
    return true
  elseif self.fl then
    return self.fl.done == true
  end
  return state(self.ref) == "done"
end

function Future:__tostring()
  return sfmt("singleflight.Future %s (%s)", quote(self.key),
              self:ready() and "ready" or "pending")
end

local M = {}

--- The light-thread spawner of backend be for a start (detached: one
-- that does not hold the caller's request), or nil.
local function spawner(be, detached)
  return detached and be.spawn_detached or be.spawn
end
M.spawner = spawner

--[[
g:start(key, fn, ...) and g:start_detached(key, fn, ...) -> a future;
fname is the method's name, for messages. Called from the methods (not in
tail position: Lua 5.1 would lose the caller's line), errors blame their
caller's caller.
]]
local function start(self, detached, fname, key, fn, ...)
  local _, _, _, skey = acquire(self, key, fn, fname, core.CHECK + core.DEEPER)
  local be = resolve((opts_of[self] or {}).backend or "auto")
  local spawn = spawner(be, detached)
  if not spawn then
    error(sfmt("singleflight: start needs a backend that can spawn light threads "
               .. "(backend %q has no spawn)", tostring(be.name or "table")), 3)
  end
  local st, c, ref
  st, c, ref, skey = acquire(self, skey, fn, fname, core.COUNT + core.DETACHED)
  if st == RECURSIVE then -- raises, unless the lead was stale (abandoned now)
    liveness.check_recursion(c, ref, skey)
    st, c, ref, skey = acquire(self, skey, fn, fname, core.DETACHED)
  end
  local lead_ref
  if st == LEADER then
    lead_ref, ref = ref, core.watch(ref)
  end
  local f = setmetatable({ group = self, key = skey, fn = fn, backend = be,
                           st = st, c = c, ref = ref, done = false,
                           n = select("#", ...), args = { ... } }, Future)
  if st == LEADER or st == JOINED then
    local fl = flight(c)
    fl.n = fl.n + 1
    f.fl = fl
  end
  if st == LEADER then
    local ok, e = runner.protect(spawn, body, f, lead_ref)
    if not ok then
      local fl = f.fl
      release(lead_ref) -- abandons the call: a waiter already here takes over
      detach(f)
      gone(c, fl)
      error(sfmt("singleflight: start cannot spawn a light thread here: %s",
                 tostring(is_panic(e) and e.value or e)), 3)
    end
  end
  return f
end

--- g:start(key, fn, ...) -> a future.
function M.start(self, key, fn, ...)
  local f = start(self, false, "start", key, fn, ...)
  return f
end

--- g:start_detached(key, fn, ...) -> a future, whose leader runs where it
-- does not hold the caller's request (OpenResty: a timer).
function M.start_detached(self, key, fn, ...)
  local f = start(self, true, "start_detached", key, fn, ...)
  return f
end


M.Future = Future

return M
