--- singleflight.flow: one g:call, from the top to the bottom and back.
--
--   call      the runner acquires the key and, for a leader, runs fn and
--             finishes the call in the core (which hands waiters in other
--             Lua states their copy); what is left comes back as a status:
--   after     deliver the result to the waiters of this state, raise the
--             panic, or join
--   join      a duplicate waits (here: through the backend; for a call led
--             in another state: in the core), then returns the result,
--             raises the panic, gives up (timeout) or takes over (the
--             leader went away)
--
-- Same-state waiters of a call meet in its flight, keyed by the call. Each
-- of them holds a core reference on the call through its ref, so the
-- address stays this call's for as long as the flight is in the table.
-- When a holder goes away without finishing (a leader's coroutine
-- collected or closed, a started call never run), its finalizer abandons
-- the call in the core and wakes the flight here: the first waiter back
-- becomes the new leader.

local core = require "singleflight.core"
local panic = require "singleflight.panic"
local runner = require "singleflight.runner"
local backends = require "singleflight.backends"
local options = require "singleflight.options"
local flights_m = require "singleflight.flights"
local liveness = require "singleflight.liveness"

local error, next, pcall, rawget, select, setmetatable, tonumber, type =
      error, next, pcall, rawget, select, setmetatable, tonumber, type

local core_wait, state, unjoin, leave, release, expire, age, now,
      core_count, tally, joinable =
      core.wait, core.state, core.unjoin, core.leave, core.release,
      core.expire, core.age, core.now, core.count, core.tally, core.joinable
local current = core.current
local _, guards = core.fast() -- coroutine -> its guard (weak keys)
local c_stats = core.methods.stats
local co_running, co_yield = coroutine.running, coroutine.yield
local co_isyieldable = coroutine.isyieldable
local panic_of, new_panic = panic.of, panic.new
local resolve, cannot_wait = backends.resolve, backends.cannot_wait
local DEFAULTS = options.DEFAULTS

local ST = core.ST -- the binding's statuses, by name (see csrc/lsf.c)
local DONE, JOINED, RECURSIVE, PANICKED, DELIVER, DONE_GONE, PANICKED_GONE =
      ST.DONE, ST.JOINED, ST.RECURSIVE, ST.PANICKED, ST.DELIVER, ST.DONE_GONE,
      ST.PANICKED_GONE
local TIMEOUT = "singleflight: wait timed out"

local M = { TIMEOUT = TIMEOUT }

-- The flights: the same-state waiters of one call (singleflight.flights)
local flights, flight, deliver, gone, drop_waiter, obj_of, put_obj,
      wait_flight, cannot_wait_msg, pwait =
      flights_m.flights, flights_m.flight, flights_m.deliver, flights_m.gone,
      flights_m.drop_waiter, flights_m.obj_of, flights_m.put_obj,
      flights_m.wait_flight, flights_m.cannot_wait_msg, flights_m.pwait
local OVER_OK, OVER_PANIC = flights_m.OVER_OK, flights_m.OVER_PANIC

-- handle -> its options, kept in the handle itself (a weak table of
-- handles would be walked by the collector at every cycle)
local core_options = core.options
local opts_of = setmetatable({}, {
  __index = function(_, g)
    return core_options(g)
  end,
  __newindex = function(_, g, o)
    core_options(g, o)
  end,
})
M.opts_of = opts_of

---------------------------------------------------------------------------
-- The leader's side

local rerun, lead = runner.rerun, runner.lead
M.lead = lead
-- LuaJIT and 5.1 lead in Lua (runner.lua): call acquires (core.enter)
-- from its own frame, which keeps a waiter's stack as shallow as on 5.2
-- and later, where core.run also leads
local acquire_first = core.run == nil
local enter = core.run or core.enter
local COUNT = core.COUNT
local join
local check_recursion = liveness.check_recursion

-- The panic of a run that raised a, traceback b, for key d. A panic that
-- a tier above this state raised (singleflight.shm: a leader's panic come
-- from another worker) is already the call's: raised as it is.
local function panic_for(a, b, d)
  if panic.is_panic(a) and rawget(a, "crossed") == true then
    a.crossed, a.key = nil, d
    return a
  end
  return new_panic(a, b, d)
end

-- An execution that outlived max_age (taken over meanwhile) finished
-- first: its outcome answers the callers of this state still waiting on
-- the key's execution now in flight, as nginx's proxy_cache_lock_age
-- serves every waiter with the first response to arrive. That execution
-- runs on, for its own caller, and for those who join it from now on.
local function answer(self, key, ok, v, err, p)
  if self ~= nil then
    local found, c = pcall(current, self, key)
    if found and c ~= nil and flights[c] ~= nil then
      deliver(c, ok, v, err, p, true)
    end
  end
end

-- What a run that did not end in DONE left to do: st and a, b, c, d are
-- its status and values (see runner.lua); retake is how a waiter of this
-- call takes over.
local function after(self, key, fn, retake, st, a, b, c, d, ...)
  if st == DELIVER then -- v, err, shared, call
    deliver(d, true, a, b, nil, c)
    return a, b, c
  elseif st == PANICKED then -- value, traceback, call|nil, key
    local p = panic_for(a, b, d)
    if c then
      deliver(c, false, nil, nil, p)
    end
    error(p, 0)
  elseif st == DONE_GONE then -- expired (v, err, shared, call)
    gone(d)
    answer(self, key, true, a, b)
    return a, b, c
  elseif st == PANICKED_GONE then -- (value, traceback, call, key)
    gone(c)
    local p = panic_for(a, b, d)
    answer(self, key, false, nil, nil, p)
    error(p, 0)
  end
  return join(self, st, a, b, c, retake, d, fn, ...) -- call, holder, key, opts
end
M.after = after
M.answer = answer

-- A caller that gave up waiting and runs fn itself, unshared.
local function run_unshared(self, skey, fn, ...)
  core_count(self, "executions")
  local ok, v, err = runner.protect(fn, ...)
  if not ok then
    core_count(self, "panics")
    error(panic_of(v, skey), 0)
  end
  return v, err, false
end

---------------------------------------------------------------------------
-- The duplicate's side

-- The backend a handle's duplicates wait with: "auto" is looked up at
-- each wait (the caller's scheduler), a name or a table once.
local function backend_of(opts)
  local be = resolve(opts.backend)
  if opts.backend ~= "auto" and opts ~= DEFAULTS then
    opts.be = be
  end
  return be
end

-- A same-state duplicate waits on the flight of c.
local function wait_local(opts, c, ref, skey, deadline)
  local be = opts.be or backend_of(opts)
  -- in the flight before anything can yield (a backend's can_wait may):
  -- the leader's result, if it comes meanwhile, is kept there
  local fl = flight(c)
  fl.n = fl.n + 1
  local why = be.can_wait and cannot_wait(be)
  if why then
    drop_waiter(c, fl)
    if opts.timeout == 0 then -- it would not have waited anyway
      leave(ref)
      return "timeout"
    end
    unjoin(ref)
    error(cannot_wait_msg(skey, why), 0)
  end
  local ok, e = true, nil
  if be.never_fails and obj_of(fl, be) ~= nil then -- nothing here can raise
    wait_flight(fl, be, ref, c, skey, deadline, opts.max_age)
  else
    ok, e = pwait(wait_flight, fl, be, ref, c, skey, deadline, opts.max_age)
  end
  drop_waiter(c, fl)
  if not ok then -- the backend failed: as if this caller had not joined
    unjoin(ref)
    error(e, 0)
  end
  if fl.done then
    release(ref)
    if fl.ok then
      return "done", true, fl.v, fl.err
    end
    return "done", false, fl.panic
  elseif fl.abandoned then
    release(ref)
    return "abandoned"
  end
  leave(ref)
  return "timeout"
end

-- Waits for a call led in another state by polling the core between
-- sleeps of the backend: for an OS thread that runs an event loop (nginx
-- with lua_code_cache off makes a Lua state per request), which a blocking
-- wait would freeze.
local POLL_MIN, POLL_MAX = 0.001, 0.05

local function poll_foreign(be, ref, skey, deadline, max_age)
  local why = cannot_wait(be)
  if why then
    unjoin(ref)
    error(cannot_wait_msg(skey, why), 0)
  end
  local pause = POLL_MIN
  while true do
    local r, ok, v, err = core_wait(ref, 0, true)
    if r ~= "timeout" then
      return r, ok, v, err
    end
    if max_age and (age(ref) or 0) >= max_age then
      expire(ref, max_age)
    elseif deadline and now() >= deadline then
      return core_wait(ref, 0) -- gives up, counted
    else
      be.sleep(pause)
      pause = pause * 2 < POLL_MAX and pause * 2 or POLL_MAX
    end
  end
end

-- A duplicate of a call led in another Lua state blocks its OS thread in
-- the core, waking at max_age to expire the call.
local function wait_foreign(opts, ref, skey, deadline)
  local max_age = opts.max_age
  local be = opts.be or backend_of(opts)
  if be.loop then
    return poll_foreign(be, ref, skey, deadline, max_age)
  end
  while true do
    local left = deadline and deadline - now() or -1
    if deadline and left < 0 then
      left = 0
    end
    local rest = max_age and max_age - (age(ref) or 0)
    if not rest or (left >= 0 and left <= rest) then
      return core_wait(ref, left)
    end
    local r, ok, v, err = core_wait(ref, rest > 0 and rest or 0, true)
    if r ~= "timeout" then
      return r, ok, v, err
    end
    expire(ref, max_age) -- the next wait says "abandoned"
  end
end

-- join's own status, beside the binding's: a call seen abandoned already
local TAKE_OVER = "take over"
-- the statuses of a run that ended (its outcome is for after)
local ENDED = { [PANICKED] = true, [DELIVER] = true, [DONE_GONE] = true,
                [PANICKED_GONE] = true }

function join(self, st, c, ref, skey, retake, opts, fn, ...)
  if opts == nil then -- not known yet (false: none)
    opts = opts_of[self]
  end
  opts = opts or DEFAULTS
  if not liveness.sweeping and rawget(_G, "ngx") ~= nil then
    liveness.watch()
  end
  -- one deadline for the whole wait, across leaders that go away
  local deadline = opts.timeout and now() + opts.timeout
  while true do
    local r, ok, v, err
    if st == TAKE_OVER then
      r = "abandoned"
    elseif st == RECURSIVE then
      check_recursion(c, ref, skey)
      r = "abandoned" -- a stale lead, abandoned now
    elseif opts.max_age and expire(ref, opts.max_age) then
      gone(c) -- too old: taken over, here and now
      release(ref)
      r = "abandoned"
    else
      if st == JOINED then
        r, ok, v, err = wait_local(opts, c, ref, skey, deadline)
      else
        r, ok, v, err = wait_foreign(opts, ref, skey, deadline)
      end
    end
    if r == "done" then
      if ok then
        return v, err, true
      end
      if st == JOINED then
        error(v, 0) -- the leader's own panic
      end
      error(new_panic(v, err, skey), 0)
    elseif r == "timeout" then
      if opts.on_timeout == "run" then
        return run_unshared(self, skey, fn, ...)
      end
      return nil, TIMEOUT, false
    elseif r == "error" then
      error(ok, 0)
    end
    -- abandoned: the first waiter back becomes the new leader
    local a, b, d
    st, a, b, d, c = retake(self, skey, fn, ...)
    if st == DONE then
      return a, b, d
    elseif ENDED[st] then
      return after(self, skey, fn, retake, st, a, b, d, c, ...)
    end
    c, ref, skey = a, b, d
  end
end

---------------------------------------------------------------------------
-- g:call(key, fn, ...)

--[[
g:call on the classic API. A same-state duplicate (JOINED: a is the call,
b its ref, c the key, d the handle's options or false) waits right here in
the common case, in call's own frame, so that a waiter's stack is no
deeper than it need be: a flight that others wait on already (so a
finalizer that abandoned the call has marked it), no timeout or max_age,
a backend whose wait can't fail and that can wait here. The rest goes to
join.

Later duplicates of such a call, in a group private to this state, meet
its flight in Lua without crossing into the core (joinable, see below and
csrc/lsf.c): the core is crossed once per execution, not once per caller.
]]
local IN_NGX = rawget(_G, "ngx") ~= nil
local call
-- owner id -> the guard of that id, while it lives (weak values): a
-- flight keeps its leader's id (fl.lead), never the guard, whose
-- finalizer is what sees a collected leader go
local owners = core.owners

-- Whether the running coroutine may wait, with a bare yield, on a call
-- whose leader has owner id: it can yield, and it is not that leader
-- (whose own call of the key is a recursion). In one crossing where the
-- binding has it (5.3 and later); on LuaJIT, call looks itself.
local meets = core.meets

-- The wait of a same-state duplicate in flight fl, until the call is
-- done or gone (fl.over: how it ended), through a bare yield (whose wake
-- does nothing, and needs no count) or be's wait object; then its
-- results, the leader's panic, or a take-over. A duplicate that joined
-- in the core (b, its ref) leaves the flight's count and gives its
-- reference back, unless the flight holds it (staked); one that met the
-- flight in Lua holds none, and a, c, d (call, key, options) are the
-- flight's.
local function wait_in(self, fl, bare, be, b, staked, a, c, d, fn, ...)
  local st = fl.over -- (set already where a finalizer went first)
  if not st then
    if bare then
      repeat
        co_yield()
        st = fl.over
      until st
    else
      local counts = fl.counts
      counts[be] = counts[be] + 1
      local wait, obj = be.wait, fl.objs[be]
      repeat
        wait(obj)
        st = fl.over
      until st
      counts[be] = counts[be] - 1
    end
  end
  if b ~= nil then -- joined in the core
    fl.n = fl.n - 1 -- done or gone took the flight off flights already
    if not staked then
      release(b)
    end
  end
  if st == OVER_OK then
    return fl.v, fl.err, true
  elseif st == OVER_PANIC then
    error(fl.panic, 0) -- the leader's own panic
  end
  -- gone: the first waiter back takes over, as any waiter would
  if b == nil then
    a, c, d = fl.c, fl.key, fl.opts
  end
  return join(self, TAKE_OVER, a, nil, c, rerun, d, fn, ...)
end

-- A same-state duplicate that joined in the core (enter said JOINED: a
-- the call, b its ref, c the key, d the handle's options, e the leader's
-- owner id or nil) waits in the call's flight, in call's stead (a tail
-- call: the leader's frame, below fn, stays small).
local function joined(self, fn, a, b, c, d, e, ...)
  d = d or DEFAULTS
  local be = d.be or backend_of(d)
  if d.timeout or d.max_age or not be.never_fails or (IN_NGX and not liveness.sweeping) then
    return join(self, JOINED, a, b, c, rerun, d, fn, ...)
  end
  -- the flight first: a can_wait that yields finds the result kept there
  -- its wait: a bare yield (a fixed backend only: an "auto" one may be
  -- another for a later duplicate, which meets through wait objects)
  local bare = be.yields and d.be ~= nil and co_isyieldable
  local fl = flights[a]
  if fl == nil or not bare and obj_of(fl, be) == nil then
    -- the call's first waiter here (through be's wait object): the
    -- object, and a look at whether a finalizer abandoned the call
    -- before there was a flight to mark
    local obj = true
    if not bare and be.new then
      local made
      made, obj = pcall(be.new)
      if not made then
        return join(self, JOINED, a, b, c, rerun, d, fn, ...)
      end
    end
    fl = fl or flight(a)
    if not bare then
      put_obj(fl, be, obj)
    end
    if state(b) == "abandoned" then
      gone(a, fl)
    end
  end
  local can
  if bare then
    can = co_isyieldable()
  else
    can = be.can_wait == nil or be.can_wait()
  end
  if not can then
    return join(self, JOINED, a, b, c, rerun, d, fn, ...)
  end
  -- The later duplicates of a call of a group private to this state (e:
  -- its leader's owner id, while the leader's guard lives) meet in its
  -- flight, in Lua; this joiner's core reference becomes the flight's,
  -- given back when the call is done or gone (settle): while any of
  -- them waits, the leader hands the result here.
  local staked = false
  if e ~= nil and not fl.reg and not fl.abandoned then
    local reg = joinable[self]
    if reg == nil then
      reg = {}
      joinable[self] = reg
    end
    reg[c] = fl
    fl.reg, fl.key, fl.c, fl.group, fl.opts, fl.be, fl.auto, fl.stake =
      reg, c, a, self, d, be, d.be == nil, b
    fl.extra, fl.bare, fl.lead = 0, bare and true or false, e
    staked = true
  end
  -- counted in the flight, which stays in flights while n > 0
  fl.n = fl.n + 1
  return wait_in(self, fl, bare, be, b, staked, a, c, d, fn, ...)
end

function call(self, key, fn, ...)
  local fl = joinable[self]
  if fl ~= nil then
    fl = fl[key]
    -- a duplicate of a call its other duplicates wait on: it meets them
    -- here, in Lua, unless it is that call's leader (a recursion goes to
    -- the core, which refuses it) or it waits with another backend. (A
    -- registered flight is open: settle takes it off as it ends; and in
    -- nginx the sweep runs while it waits.)
    if fl ~= nil then
      local bare, st = fl.bare
      if bare then -- a fixed backend whose wait is a bare yield
        if meets then
          st = meets(fl.lead)
        else -- (LuaJIT: the same looks, in this trace)
          st = co_isyieldable() and guards[co_running()] ~= owners[fl.lead]
        end
      elseif guards[co_running()] ~= owners[fl.lead] then
        local be = fl.be
        if fl.auto and backend_of(fl.opts) ~= be then
          st = false
        else
          st = be.can_wait == nil or be.can_wait()
        end
      end
      if st then
        -- met: counted here, not in fl.n (a registered flight stays in
        -- flights until it is settled); the flight's stake holds the call
        fl.extra = fl.extra + 1
        if bare then -- the common case, here (wait_in's own loop)
          repeat
            co_yield()
            st = fl.over
          until st
          if st == OVER_OK then
            return fl.v, fl.err, true
          end
        end
        return wait_in(self, fl, bare, fl.be, nil, nil, nil, nil, nil, fn, ...)
      end
    end
  end
  local st, a, b, c, d, e = enter(self, key, fn, ...)
  if st == DONE and acquire_first then -- leads it: a is the call, c the key
    st, a, b, c, d = lead(self, a, c, fn, ...)
  end
  if st == DONE then
    return a, b, c
  elseif st ~= JOINED then
    return after(self, key, fn, rerun, st, a, b, c, d, ...)
  end
  return joined(self, fn, a, b, c, d, e, ...)
end
M.call = call

if rawget(_G, "jit") then
  -- LuaJIT compiles no classic C call, and fn is opaque to it: a leader
  -- reaches the core through the FFI where it can (see csrc/lsf_fast.c):
  -- a string key, a coroutine that has its guard, no call in flight,
  -- nobody waiting at the end. Anything else goes the classic way. The
  -- frame keeps self and the guard alive while fn runs.
  local classic = M.call
  local handler = panic.handler
  local settled = runner.settled
  local getmetatable = getmetatable
  local okffi, ffi = pcall(require, "ffi")
  if okffi and core.fast then
    if not pcall(ffi.typeof, "struct singleflight_fast_1") then
      ffi.cdef [[
        struct singleflight_fast_1 {
          int (*lead)(void *, const char *, size_t, void *, unsigned,
                      uintptr_t *);
        };
      ]]
    end
    local api, _, GROUP = core.fast()
    api = ffi.cast("struct singleflight_fast_1 *", api)
    local fast_lead = api.lead
    local fast_finish = core.fast_finish
    local addr = ffi.new("uintptr_t[1]")
    local call_at, own_guard = core.call_at, core.own_guard
    local main_gd -- the main thread's guard, once it has one
    -- for bench/floor_jit.lua: the same steps, without the rest
    M.fast = { lead = fast_lead, finish = fast_finish, guards = guards }

    -- The rest of a fast lead that someone waits on, or whose fn raised:
    -- settled's statuses need no fn (no take-over); the handle, for an
    -- expired call's answer.
    local function slow_end(self, key, caddr, ok, v, err)
      local c = call_at(caddr)
      if not ok then
        return after(self, key, nil, rerun, settled(c, key, false, v))
      end
      local st, a, b, d, e = settled(c, key, true, v, err)
      if st == DONE then
        return a, b, d
      end
      return after(self, key, nil, rerun, st, a, b, d, e)
    end

    local function main_guard()
      main_gd = own_guard()
      return main_gd
    end

    -- The fast lead: call enters it in tail position with the n (at most
    -- two) arguments of fn, x and y, taken before coroutine.running, which
    -- ends LuaJIT's trace (the trace that goes on after it can't read the
    -- varargs of a frame entered before it). Its frame is kept small (n,
    -- x, y then hold fn's results), so that a leader's coroutine stack
    -- grows no more than plain Lua's would.
    local function lead_fast(self, key, fn, n, x, y)
      local gd = co_running()
      if gd then
        gd = guards[gd] or own_guard()
      else
        gd = main_gd or main_guard()
      end
      if fast_lead(self, key, #key, gd, COUNT, addr) ~= 0 then
        if n == 0 then
          return classic(self, key, fn)
        elseif n == 1 then
          return classic(self, key, fn, x)
        end
        return classic(self, key, fn, x, y)
      end
      -- a number, not a pointer: it is only compared with the guard's calls
      local caddr = tonumber(addr[0])
      if n == 0 then
        n, x, y = xpcall(fn, handler)
      elseif n == 1 then
        n, x, y = xpcall(fn, handler, x)
      else
        n, x, y = xpcall(fn, handler, x, y)
      end
      if n then -- x, y: fn's v, err
        local shared = fast_finish(gd, caddr)
        if shared >= 0 then
          return x, y, shared == 1
        end
      end
      return slow_end(self, key, caddr, n, x, y)
    end

    -- The same for an fn without arguments (the most common: a closure),
    -- in a frame smaller still: with three more parameters, a leader's
    -- stack outgrows a new coroutine's on LuaJIT. (The guard's look-up is
    -- written out in each: a function of its own would return from the
    -- trace coroutine.running begins, which LuaJIT can't compile.)
    local function lead_fast0(self, key, fn)
      local gd = co_running()
      if gd then
        gd = guards[gd] or own_guard()
      else
        gd = main_gd or main_guard()
      end
      if fast_lead(self, key, #key, gd, COUNT, addr) ~= 0 then
        return classic(self, key, fn)
      end
      local caddr = tonumber(addr[0])
      local ok, v, err = xpcall(fn, handler)
      if ok then
        gd = fast_finish(gd, caddr) -- whether anyone joined, or -1
        if gd >= 0 then
          return v, err, gd == 1
        end
      end
      return slow_end(self, key, caddr, ok, v, err)
    end
    M.lead_fast, M.lead_fast0 = lead_fast, lead_fast0

    function M.call(self, key, fn, ...)
      local n, reg = select("#", ...), joinable[self]
      if n > 2 or getmetatable(self) ~= GROUP or type(key) ~= "string"
         or type(fn) ~= "function" or reg ~= nil and reg[key] ~= nil then
        return classic(self, key, fn, ...)
      elseif n == 0 then
        return lead_fast0(self, key, fn)
      end
      return lead_fast(self, key, fn, n, ...)
    end
  end
end

liveness.leader_frame(lead)
if M.lead_fast then
  liveness.leader_frame(M.lead_fast)
  liveness.leader_frame(M.lead_fast0)
end

--- g:stats(): the core's counters, once the duplicates that met in Lua
-- are counted there.
function M.stats(self)
  local reg = joinable[self]
  if reg ~= nil then
    for _, fl in next, reg do
      if fl.extra > 0 then
        tally(self, fl.extra, fl.extra)
        fl.extra = 0
      end
    end
  end
  return c_stats(self)
end

M.rerun = rerun

return M
