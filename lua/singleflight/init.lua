--- singleflight: duplicate-call suppression for Lua.
--
-- While a call for a key is in flight, every other caller of that key waits
-- for it and gets the same result. The C module singleflight.core keeps the
-- in-flight calls; this file runs the callback, makes duplicates wait
-- through a scheduler and turns errors into panic errors.

local core = require "singleflight.core"

local error, getmetatable, pairs, pcall, rawget, select, setmetatable,
      tostring, type, xpcall, require =
      error, getmetatable, pairs, pcall, rawget, select, setmetatable,
      tostring, type, xpcall, require
local co_create, co_resume, co_running, co_status, co_yield =
      coroutine.create, coroutine.resume, coroutine.running, coroutine.status,
      coroutine.yield
local co_isyieldable = coroutine.isyieldable
local traceback = debug.traceback
local sfmt = string.format

local acquire, finish, unjoin, leave, publish, core_wait, core_count, now,
      quote, guard_of, alias =
      core.acquire, core.finish, core.unjoin, core.leave, core.publish,
      core.wait, core.count, core.now, core.quote, core.guard, core.alias

local LEADER, JOINED = 0, 1
local TIMEOUT = "singleflight: wait timed out"
local LUA51 = _VERSION == "Lua 5.1" and not rawget(_G, "jit")

local M = {
  _VERSION = "singleflight 0.1.0",
  TIMEOUT = TIMEOUT,
}

---------------------------------------------------------------------------
-- Panic errors

local Panic = { __name = "singleflight.Panic" }

-- tostring that never raises: a failing __tostring gives the type's name.
local function safe_tostring(v)
  local ok, s = pcall(tostring, v)
  if ok and type(s) == "string" then
    return s
  end
  return "(" .. type(v) .. " value, __tostring failed)"
end

function Panic.__tostring(e)
  return "singleflight: " .. safe_tostring(rawget(e, "value"))
end

local function new_panic(value, tb, key)
  return setmetatable({ value = value, traceback = tb or "", key = key }, Panic)
end

local function is_panic(x)
  return type(x) == "table" and getmetatable(x) == Panic
end
M.is_panic = is_panic

local function strip_nl(tb)
  if type(tb) == "string" and tb:sub(1, 1) == "\n" then
    return tb:sub(2)
  end
  return tb
end

-- The message handler of the leader's pcall: keeps the value untouched and
-- notes where it was raised.
local function msgh(e)
  return new_panic(e, strip_nl(traceback("", 2)))
end

---------------------------------------------------------------------------
-- Running fn: run(fn, ...) -> true, v, err | false, panic

-- running() is the coroutine the caller's scheduler resumes: on Lua 5.1,
-- the one past the helper coroutines fn runs in. A backend that wakes
-- coroutines by identity (copas) needs that one.
local run, yieldable51
local running = co_running
if not LUA51 then
  run = function(fn, ...)
    return xpcall(fn, msgh, ...)
  end
else
  -- Lua 5.1 can't yield across pcall: fn runs in a coroutine of its own
  -- whose yields are passed up to the caller's scheduler. helper -> the
  -- coroutine that runs it (false: the main one).
  local parent51 = setmetatable({}, { __mode = "kv" })
  local getinfo = debug.getinfo

  -- True when co's stack holds a C function that called back into Lua
  -- (pcall, table.sort, ...): 5.1 can't yield across it. Level 0 is
  -- getinfo itself for the running coroutine, and resume for a parent.
  local function c_boundary(co)
    local level = 1
    while true do
      local info = getinfo(co, level, "S")
      if info == nil then
        return false
      elseif info.what == "C" then
        return true
      end
      level = level + 1
    end
  end

  -- Can co (nil: the main coroutine) yield? Its helpers' parents must too.
  yieldable51 = function(co)
    while co do
      if c_boundary(co) then
        return false
      end
      local parent = parent51[co]
      if parent == nil then
        return true
      end
      co = parent
    end
    return false
  end

  local function step(co, ok, ...)
    if co_status(co) == "dead" then
      if ok then
        return true, ...
      end
      return false, new_panic((...), strip_nl(traceback(co, "")))
    end
    local outer = co_running()
    if outer == nil then
      return false, new_panic("attempt to yield from outside a coroutine")
    elseif not yieldable51(outer) then
      return false, new_panic("attempt to yield across metamethod/C-call boundary")
    end
    return step(co, co_resume(co, co_yield(...)))
  end
  -- The helper's body: coroutine.create takes only Lua functions, and fn
  -- may be a C function or a callable value.
  local function body(fn, ...)
    return fn(...)
  end
  run = function(fn, ...)
    local co = co_create(body)
    alias(co, guard_of())
    parent51[co] = co_running() or false
    return step(co, co_resume(co, fn, ...))
  end
  running = function()
    local co = co_running()
    while co do
      local parent = parent51[co]
      if parent == nil then
        return co
      end
      co = parent or nil
    end
    return nil
  end
end

---------------------------------------------------------------------------
-- Backends: how a duplicate in the leader's own Lua state waits.
--
-- A backend is a table:
--   new()            -> a wait object for one in-flight call (optional)
--   wait(obj, secs)  block the running coroutine until wake(obj) or secs
--                    seconds (nil: no limit); may return early
--   wake(obj, n)     wake the n coroutines waiting on obj
--   can_wait()       -> true, or false and why (optional)
--   spawn(fn, ...)   run fn(...) in a new light thread (optional; start)

local function in_yieldable_coroutine()
  if co_isyieldable then
    if co_isyieldable() then
      return true
    end
  elseif yieldable51 then
    if yieldable51(co_running()) then
      return true
    end
  else
    local co, main = co_running()
    if co ~= nil and not main then
      return true
    end
  end
  local co, main = co_running()
  if co == nil or main then
    return false, "the main coroutine cannot wait"
  end
  return false, "the running coroutine cannot yield here"
end

-- LuaJIT (2.1.0-beta3) can spin for ever when a __gc finalizer enters a
-- pairs() loop compiled earlier, and a collected leader's guard reports
-- abandonment from its finalizer: wake_all and every backend's wake run
-- there, so they stay interpreted (the JIT can't be switched off from
-- inside a finalizer).
local interpreted = function() end
do
  local jit = rawget(_G, "jit")
  if type(jit) == "table" and type(jit.off) == "function" then
    local jit_off = jit.off
    interpreted = function(f)
      pcall(jit_off, f) -- refused for C functions, which need nothing
    end
  end
end

local backends = {}

backends.none = {
  name = "none",
  wait = function() end,
  wake = function() end,
  can_wait = function()
    return false, "no backend to wait with (backend \"none\"; see the backend option)"
  end,
}

backends.coroutine = {
  name = "coroutine",
  -- its can_wait is exact where coroutine.isyieldable exists (5.3+,
  -- LuaJIT): then its wait can't fail, and goes unprotected
  never_fails = co_isyieldable ~= nil,
  wait = function()
    co_yield()
  end,
  wake = function() end,
  can_wait = in_yieldable_coroutine,
}

-- Backends that live in their own files, loaded on first use.
local lazy_backends = { ngx = true, cqueues = true, copas = true }

local function get_backend(name)
  local be = backends[name]
  if be == nil and lazy_backends[name] then
    be = require("singleflight.backend." .. name)
    interpreted(be.wake)
    backends[name] = be
  end
  return be
end

-- OpenResty hands the coroutines of finished requests to later ones: the
-- ngx backend ties each coroutine's guard to its request, before every
-- acquire (see request_guards there).
if type(rawget(_G, "ngx")) == "table" and type(rawget(_G, "ngx").get_phase) == "function" then
  local ok, be = pcall(get_backend, "ngx")
  local claim = ok and be.request_guards(core)
  if claim then
    local acquire_raw = acquire
    acquire = function(...)
      claim()
      return acquire_raw(...)
    end
  end
end

-- "auto": the scheduler the caller is running under, if any.
local function auto_backend()
  local ngx = rawget(_G, "ngx")
  if type(ngx) == "table" and type(ngx.get_phase) == "function" then
    return get_backend("ngx")
  end
  local loaded = package.loaded
  local cq = loaded.cqueues
  if type(cq) == "table" and type(cq.running) == "function" and cq.running() then
    return get_backend("cqueues")
  end
  local copas = loaded.copas
  if type(copas) == "table" then
    local be = get_backend("copas")
    if be.can_wait() then
      return be
    end
  end
  return backends.none
end

local function resolve_backend(spec)
  if spec == "auto" then
    return auto_backend()
  elseif type(spec) == "string" then
    return get_backend(spec)
  end
  return spec
end

---------------------------------------------------------------------------
-- Options

local DEFAULTS = { on_timeout = "error", backend = "auto" }
local options = setmetatable({}, { __mode = "k" }) -- handle -> options

local backend_names = {
  auto = true, ngx = true, cqueues = true, copas = true, coroutine = true,
  none = true,
}

-- level: 1 when raised from check_options, 2 from a function it calls.
local function option_error(fname, name, msg, level)
  error(sfmt("bad option '%s' to '%s' (%s)", name, fname, msg), 3 + (level or 1))
end

local function check_backend_table(fname, be)
  if type(be.wait) ~= "function" or type(be.wake) ~= "function" then
    option_error(fname, "backend", "a backend table needs functions 'wait' and 'wake'", 2)
  end
  for _, f in pairs { "new", "can_wait", "spawn" } do
    if be[f] ~= nil and type(be[f]) ~= "function" then
      option_error(fname, "backend", sfmt("backend field '%s' must be a function", f), 2)
    end
  end
  interpreted(be.wake)
end

local function check_options(fname, argn, opts)
  if opts == nil then
    return DEFAULTS
  end
  if type(opts) ~= "table" then
    error(sfmt("bad argument #%d to '%s' (table expected, got %s)", argn, fname,
               type(opts)), 3)
  end
  local o = { on_timeout = "error", backend = "auto" }
  for k, v in pairs(opts) do
    if k == "timeout" then
      if type(v) ~= "number" or v ~= v or v < 0 then
        option_error(fname, "timeout",
                     sfmt("non-negative number expected, got %s",
                          type(v) == "number" and tostring(v) or type(v)))
      end
      if v ~= math.huge then
        o.timeout = v
      end
    elseif k == "on_timeout" then
      if v ~= "error" and v ~= "run" then
        option_error(fname, "on_timeout",
                     sfmt("\"error\" or \"run\" expected, got %s",
                          type(v) == "string" and sfmt("%q", v) or type(v)))
      end
      o.on_timeout = v
    elseif k == "backend" then
      if type(v) == "table" then
        check_backend_table(fname, v)
      elseif type(v) ~= "string" or not backend_names[v] then
        option_error(fname, "backend",
                     sfmt("one of \"auto\", \"ngx\", \"cqueues\", \"copas\", "
                          .. "\"coroutine\", \"none\" or a table expected, got %s",
                          type(v) == "string" and sfmt("%q", v) or type(v)))
      end
      o.backend = v
    else
      error(sfmt("bad option '%s' to '%s' (unknown option)", tostring(k), fname), 3)
    end
  end
  return o
end

---------------------------------------------------------------------------
-- Waiting in the leader's own state

-- call -> { objs = {backend -> wait object}, counts = {backend -> n},
--           done, ok, v, err, panic, abandoned }
local locals = {}

local function wake_all(rec)
  for be, obj in pairs(rec.objs) do
    local n = rec.counts[be]
    if n > 0 then
      pcall(be.wake, obj, n)
    end
  end
end

-- The backend's wait, protected where a protected call can yield (not on
-- Lua 5.1), so that a wait that fails leaves the call as it found it.
local pwait = LUA51 and function(f, ...) return true, f(...) end or pcall

-- A waiter's backend raised (a yield across a C boundary on 5.2, where
-- nothing tells beforehand, or the backend's own error): undo the join and
-- raise.
local function wait_failed(rec, be, c, skey, e)
  rec.counts[be] = rec.counts[be] - 1
  rec.n = rec.n - 1
  if not rec.done and not rec.abandoned then
    unjoin(c)
    if rec.n == 0 and locals[c] == rec then
      locals[c] = nil
    end
  end
  if type(e) == "string" and e:find("attempt to yield", 1, true) then
    e = sfmt("singleflight: cannot wait for key %s: %s", quote(skey),
             "the running coroutine cannot yield here")
  end
  error(e, 0)
end

-- Why the running coroutine can't wait through be, or nil when it can.
local function cannot_wait(be, skey)
  local can, why = true, nil
  if be.can_wait then
    can, why = be.can_wait()
  end
  if not can then
    return sfmt("singleflight: cannot wait for key %s: %s", quote(skey),
                why or "the backend cannot wait here")
  end
end

-- Counts one more waiter through be on holder (a call's local record or a
-- future) and returns be's wait object for it.
local function enlist(holder, be)
  local obj = holder.objs[be]
  if obj == nil then
    obj = be.new and be.new() or true
    holder.objs[be] = obj
    holder.counts[be] = 0
  end
  holder.counts[be] = holder.counts[be] + 1
  return obj
end

local function wait_local(opts, c, skey, deadline)
  local be = resolve_backend(opts.backend)
  local why = cannot_wait(be, skey)
  if why then
    unjoin(c)
    error(why, 0)
  end
  local rec = locals[c]
  if not rec then
    rec = { objs = {}, counts = {}, n = 0 }
    locals[c] = rec
  end
  local obj = enlist(rec, be)
  rec.n = rec.n + 1
  while not rec.done and not rec.abandoned do
    local remaining
    if deadline then
      remaining = deadline - now()
      if remaining <= 0 then
        break
      end
    end
    if be.never_fails then
      be.wait(obj, remaining)
    else
      local ok, e = pwait(be.wait, obj, remaining)
      if not ok then
        wait_failed(rec, be, c, skey, e)
      end
    end
  end
  rec.counts[be] = rec.counts[be] - 1
  rec.n = rec.n - 1
  if rec.done then
    if rec.ok then
      return "done", true, rec.v, rec.err
    end
    return "done", false, rec.panic
  elseif rec.abandoned then
    return "abandoned"
  end
  leave(c)
  return "timeout"
end

---------------------------------------------------------------------------
-- The leader's side

-- Called when the leader's fn returned or raised and someone is waiting.
local function leader_slow(skey, c, ok, shared, nlocal, nforeign, v, err)
  local p
  if not ok then
    p = v
    if not is_panic(p) then -- an error in the error handler itself
      p = new_panic(p)
    end
    p.key = skey
  end
  if nforeign > 0 then
    if ok then
      publish(c, true, v, err)
    else
      publish(c, false, p.value, nil, p.traceback)
    end
  end
  if nlocal > 0 then
    local rec = locals[c]
    if rec then
      locals[c] = nil
      rec.done, rec.ok, rec.v, rec.err, rec.panic = true, ok, v, err, p
      wake_all(rec)
    end
  end
  if not ok then
    error(p, 0)
  end
  return v, err, shared
end

-- The guard of a leader that went away calls this for each of its calls.
local function on_abandon(c)
  local rec = locals[c]
  if rec then
    locals[c] = nil
    rec.abandoned = true
    wake_all(rec)
  end
end

-- wake_all runs from a __gc finalizer too (see interpreted).
interpreted(wake_all)


local lead = core.lead or function(_, skey, guard, c, fn, ...)
  return finish(c, guard, skey, run(fn, ...))
end

-- A caller that gave up waiting and runs fn itself, unshared.
local function run_unshared(self, skey, fn, ...)
  core_count(self, "executions")
  local ok, v, err = run(fn, ...)
  if not ok then
    core_count(self, "panics")
    v.key = skey
    error(v, 0)
  end
  return v, err, false
end

---------------------------------------------------------------------------
-- The duplicate's side

local function join(self, st, c, skey, fn, ...)
  local opts = options[self] or DEFAULTS
  -- one deadline for the whole wait, across leaders that go away
  local deadline = opts.timeout and now() + opts.timeout
  while true do
    local r, ok, v, err
    if st == JOINED then
      r, ok, v, err = wait_local(opts, c, skey, deadline)
    else
      local left = deadline and deadline - now() or -1
      r, ok, v, err = core_wait(c, deadline and (left > 0 and left or 0) or -1)
    end
    if r == "done" then
      if ok then
        return v, err, true
      end
      if st == JOINED then
        error(v, 0)
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
    local guard
    st, c, guard = acquire(self, skey, fn, false)
    if st == LEADER then
      return lead(self, skey, guard, c, fn, ...)
    end
  end
end

---------------------------------------------------------------------------
-- g:start(key, fn, ...): Go's DoChan. A future joins the call in flight, or
-- the leader starts in a light thread of the backend's scheduler.

local Future = { __name = "singleflight.Future" }
Future.__index = Future

-- Waits through `be` until holder.done or the deadline; holder keeps the
-- wait objects, as a call's local record does.
local function wait_holder(be, holder, deadline)
  local obj = enlist(holder, be)
  while not holder.done do
    local remaining
    if deadline then
      remaining = deadline - now()
      if remaining <= 0 then
        break
      end
    end
    be.wait(obj, remaining)
  end
  holder.counts[be] = holder.counts[be] - 1
  return holder.done
end

local function fulfil(f, ok, v, err, shared)
  if ok then
    f.v, f.err, f.shared = v, err, shared
  else
    if is_panic(v) and is_panic(v.value) then -- raised by call: unwrap
      v = v.value
    end
    f.panic = v
  end
  f.done = true
  wake_all(f)
end

--- Waits at most `timeout` seconds (default: no limit) for the result.
function Future:wait(timeout)
  if getmetatable(self) ~= Future then
    error("bad argument #1 to 'wait' (singleflight.Future expected)", 2)
  end
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout or timeout < 0) then
    error(sfmt("bad argument #1 to 'wait' (non-negative number expected, got %s)",
               type(timeout) == "number" and tostring(timeout) or type(timeout)), 2)
  end
  if not self.done then
    local be = self.backend
    local why = cannot_wait(be, self.key)
    if why then
      error(why, 0)
    end
    if not wait_holder(be, self, timeout and now() + timeout) then
      return nil, TIMEOUT, false
    end
  end
  if self.panic ~= nil then
    error(self.panic, 0)
  end
  return self.v, self.err, self.shared
end

--- True once the result is in.
function Future:ready()
  return self.done == true
end

function Future:__tostring()
  return sfmt("singleflight.Future %s (%s)", quote(self.key),
              self.done and "ready" or "pending")
end

local function start(self, key, fn, ...)
  local opts = options[self] or DEFAULTS
  local be = resolve_backend(opts.backend)
  if not be.spawn then
    error(sfmt("singleflight: start needs a backend that can spawn light threads "
               .. "(backend %q has no spawn)", be.name or "?"), 2)
  end
  -- probe: join what is in flight, never lead from here
  local st, c, _, skey = acquire(self, key, fn, true, true)
  local f = setmetatable({ key = skey, backend = be, objs = {}, counts = {},
                           done = false }, Future)
  local n, args = select('#', ...), { ... }
  local body
  if st == nil then
    body = function()
      return self:call(skey, fn, (table.unpack or unpack)(args, 1, n))
    end
  else
    local rec = locals[c]
    if st == JOINED and not rec then
      rec = { objs = {}, counts = {}, n = 0 } -- the leader keeps our result
      locals[c] = rec
    end
    body = function()
      if st == JOINED and locals[c] ~= rec then
        -- the call ended before this thread ran: rec holds how
        if rec.done then
          if rec.ok then
            return rec.v, rec.err, true
          end
          error(rec.panic, 0)
        end
        local st2, c2, guard = acquire(self, skey, fn, false)
        if st2 == LEADER then
          return lead(self, skey, guard, c2, fn, (table.unpack or unpack)(args, 1, n))
        end
        return join(self, st2, c2, skey, fn, (table.unpack or unpack)(args, 1, n))
      end
      return join(self, st, c, skey, fn, (table.unpack or unpack)(args, 1, n))
    end
  end
  local spawned, e = pcall(be.spawn, function()
    fulfil(f, run(body))
  end)
  if not spawned then
    -- give the probe's join back, then report
    if st == JOINED then
      unjoin(c)
      local rec = locals[c]
      if rec and rec.n == 0 then
        locals[c] = nil
      end
    elseif st ~= nil then
      core_wait(c, 0)
    end
    error(e, 0)
  end
  return f
end

core.set_hooks {
  msgh = msgh,
  join = join,
  leader = leader_slow,
  abandon = on_abandon,
  tostring = safe_tostring,
}

---------------------------------------------------------------------------
-- Groups

local methods = core.methods

if core.has_c_call then
  methods.call = core.call
else
  methods.call = LUA51 and function(self, key, fn, ...)
    local st, c, guard, skey = acquire(self, key, fn, true)
    if st == LEADER then
      return finish(c, guard, skey, run(fn, ...))
    end
    return join(self, st, c, skey, fn, ...)
  end or function(self, key, fn, ...) -- LuaJIT: xpcall passes arguments on
    local st, c, guard, skey = acquire(self, key, fn, true)
    if st == LEADER then
      return finish(c, guard, skey, xpcall(fn, msgh, ...))
    end
    return join(self, st, c, skey, fn, ...)
  end
end
methods["do"] = methods.call
methods.start = start

--- A group private to this Lua state.
function M.new(opts)
  local o = check_options("new", 1, opts)
  local g = core.new()
  options[g] = o
  return g
end

--- A handle on the process-wide group `name`.
function M.group(name, opts)
  if type(name) ~= "string" then
    error(sfmt("bad argument #1 to 'group' (string expected, got %s)", type(name)), 2)
  end
  local o = check_options("group", 2, opts)
  local g = core.open(name)
  options[g] = o
  return g
end

-- For the specs and the benchmarks.
M._core = core
M._backends = backends
M._running = running

return M
