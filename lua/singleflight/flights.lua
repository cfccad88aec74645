--- singleflight.flights: the same-state waiters of one call.
--
-- The duplicates of a call in this Lua state wait in its flight, keyed by
-- the call: through a bare yield, or through a backend's wait object
-- (counted, so that the leader wakes each backend's waiters). The leader's
-- result is delivered to the flight (deliver); a call that went away
-- without one marks it gone, and the first waiter back takes over. The
-- holders' finalizers (a guard whose coroutine went away, a ref let go of)
-- hand such calls here. A flight that a private group registered for its
-- later duplicates to meet in Lua holds one core reference on the call
-- for all of them (its stake), given back when it settles.

local core = require "singleflight.core"
local backends = require "singleflight.backends"

local error, pairs, pcall, rawget, select, type =
      error, pairs, pcall, rawget, select, type
local sfmt = string.format
local state, release, expire, age, abandon, now, quote, tally =
      core.state, core.release, core.expire, core.age, core.abandon, core.now,
      core.quote, core.tally
local interpreted = backends.interpreted
local LUA51 = _VERSION == "Lua 5.1" and not rawget(_G, "jit")

local M = {}

-- call (light userdata) -> { n = waiters counted here, over, and once
--   needed: objs = {backend -> wait object}, counts = {backend -> waiting};
--   done, ok, v, err, panic, shared; abandoned; a registration's fields
--   (see flow.lua's call) }
local flights = {}
-- fl.over: how the call ended, in one field for the duplicates that met
-- in Lua (nil while it runs)
local OVER_OK, OVER_PANIC, OVER_GONE = 1, 2, 3

local function wake_all(fl)
  local objs = fl.objs
  if not objs then -- nobody waits through a backend's object
    return
  end
  for be, obj in pairs(objs) do
    local n = fl.counts[be]
    if n > 0 then
      pcall(be.wake, obj, n)
    end
  end
end

--- The flight of call c, made if there is none.
local function flight(c)
  local fl = flights[c]
  if not fl then
    -- small: a flight waits as long as its call runs, many at once; the
    -- fields of a result, a registration (see flow.lua's call) and wait
    -- objects (made for the first waiter through a backend's object: a
    -- bare yield has none) come when they are needed
    fl = { n = 0 } -- (over: nil while the call runs)
    flights[c] = fl
  end
  return fl
end

-- A flight registered for duplicates that meet in Lua (see flow.lua's call) whose
-- call is done or gone: later callers of the key go to the core again,
-- the duplicates that met here are counted, and the flight's reference on
-- the call is given back. Runs in finalizers too: nothing here allocates.
local function settle(fl)
  local reg = fl.reg
  if reg then
    fl.reg = nil
    if reg[fl.key] == fl then
      reg[fl.key] = nil
    end
    -- the calls not counted yet, each one that joined (as the core counts)
    tally(fl.group, fl.extra, fl.extra)
    fl.extra = 0
    local stake = fl.stake
    fl.stake = nil
    release(stake)
  end
end

-- The leader's result reaches the flight of c.
local function deliver(c, ok, v, err, p, shared)
  local fl = flights[c]
  if fl then
    flights[c] = nil
    fl.done, fl.ok, fl.v, fl.err, fl.panic, fl.shared = true, ok, v, err, p, shared
    fl.over = ok and OVER_OK or OVER_PANIC
    settle(fl)
    wake_all(fl)
  end
end

-- The call c (or, for fl, the call it was made for) went away without a
-- result: its waiters take over.
local function gone(c, fl)
  fl = fl or flights[c]
  if fl then
    if flights[c] == fl then
      flights[c] = nil
    end
    fl.abandoned, fl.over = true, OVER_GONE
    settle(fl)
    wake_all(fl)
  end
end

local function gone_all(...)
  for i = 1, select("#", ...) do
    gone((select(i, ...)))
  end
end

-- A waiter leaves fl: the last one out takes it off the table.
local function drop_waiter(c, fl)
  fl.n = fl.n - 1
  if fl.n == 0 and flights[c] == fl and not fl.reg then -- (see settle)
    flights[c] = nil
  end
end

-- The holders' finalizers: a guard whose coroutine went away, or was
-- closed inside a leader's frame (5.4), and a ref let go of. The binding
-- takes them through its one entry point for the Lua layer's functions.
local function guard_gc(gd)
  gone_all(abandon(gd))
end
local function guard_close(gd)
  local list = abandon(gd, true) -- nothing, on every normal return
  if list then
    for i = 1, #list do
      gone(list[i])
    end
  end
end
local function ref_gc(ref)
  local c, led = release(ref, true)
  if led then
    gone(c)
  end
end
interpreted(wake_all)
interpreted(settle)
interpreted(gone)
interpreted(gone_all)
interpreted(guard_gc)
interpreted(guard_close)
interpreted(ref_gc)
core.interpose("Guard", "__gc", guard_gc)
if core.closes then
  core.interpose("Guard", "__close", guard_close)
end
core.interpose("Ref", "__gc", ref_gc)

-- Counts one more waiter through be on fl and returns be's wait object.
-- fl's wait object for be, or nil.
local function obj_of(fl, be)
  local objs = fl.objs
  if objs then
    return objs[be]
  end
end

-- obj becomes fl's wait object for be, with no waiter counted yet.
local function put_obj(fl, be, obj)
  local objs = fl.objs
  if not objs then
    fl.objs, fl.counts = { [be] = obj }, { [be] = 0 }
  else
    objs[be], fl.counts[be] = obj, 0
  end
end

local function enlist(fl, be)
  local obj = obj_of(fl, be)
  if obj == nil then
    obj = be.new and be.new() or true
    put_obj(fl, be, obj)
  end
  fl.counts[be] = fl.counts[be] + 1
  return obj
end

local function cannot_wait_msg(skey, why)
  return sfmt("singleflight: cannot wait for key %s: %s", quote(skey), why)
end

-- The backend's wait, protected where a protected call can yield (not on
-- Lua 5.1), so that a wait that fails leaves the call as it found it.
local pwait = LUA51 and function(f, ...) return true, f(...) end or pcall

--[[
Waits through be, as one more waiter of fl (the flight of call c, held by
ref), until the call is done or gone, the deadline passes, or the call
grows older than max_age (then it expires and is gone). A backend that
fails raises, the waiter withdrawn from fl's counts.
]]
local function wait_flight(fl, be, ref, c, skey, deadline, max_age)
  local obj = obj_of(fl, be)
  if obj == nil then
    obj = enlist(fl, be)
  else
    fl.counts[be] = fl.counts[be] + 1
  end
  -- gone before this waiter was in the flight (a finalizer ran meanwhile),
  -- or expired from another state: nobody will wake the flight for that
  if state(ref) == "abandoned" then
    gone(c, fl)
  end
  local wait, safe = be.wait, be.never_fails
  while not fl.done and not fl.abandoned do
    local remaining
    if deadline then
      remaining = deadline - now()
      if remaining <= 0 then
        break
      end
    end
    if max_age then
      local rest = max_age - (age(ref) or max_age)
      if rest <= 0 then
        if expire(ref, max_age) then
          gone(c, fl)
        elseif state(ref) == "abandoned" then
          gone(c, fl)
        end
        break
      elseif remaining == nil or rest < remaining then
        remaining = rest
      end
    end
    if safe then
      wait(obj, remaining)
    else
      local ok, e = pwait(wait, obj, remaining)
      if not ok then
        fl.counts[be] = fl.counts[be] - 1
        if type(e) == "string" and e:find("attempt to yield", 1, true) then
          e = cannot_wait_msg(skey, "the running coroutine cannot yield here")
        end
        error(e, 0)
      end
    end
  end
  fl.counts[be] = fl.counts[be] - 1
end
M.wait_flight = wait_flight

M.flights = flights
M.OVER_OK, M.OVER_PANIC = OVER_OK, OVER_PANIC
M.flight, M.deliver, M.gone, M.gone_all, M.drop_waiter =
  flight, deliver, gone, gone_all, drop_waiter
M.obj_of, M.put_obj, M.cannot_wait_msg, M.pwait =
  obj_of, put_obj, cannot_wait_msg, pwait

return M
