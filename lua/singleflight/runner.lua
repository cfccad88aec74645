--- singleflight.runner: the leader's step, the one place where the Lua
-- runtimes differ.
--
--   run(g, key, fn, ...)     acquire the key (a new call, counted); lead it:
--   rerun(g, key, fn, ...)   the same for a waiter taking over (not counted)
--   run_local, rerun_local   the same for a tier's own call in this state
--   lead(g, call, key, fn, ...)   lead a call acquired already (a future's)
--     -> DONE 0, v, err, shared | DELIVER 7, v, err, shared, call
--      | PANICKED 6, value, traceback, call|nil, key
--      | DONE_GONE 9, PANICKED_GONE 10: the same for a call that expired
--      | or acquire's status for a caller that does not lead (joined,
--        foreign, recursive, tiered: see csrc/lsf.c)
--     fn runs protected; its frame keeps the group's handle alive.
--   protect(fn, ...) -> true, ... | false, panic: fn run protected, on its
--     own (a caller that gave up waiting and runs fn unshared).
--   running() -> the coroutine the caller's scheduler resumes (on 5.1,
--     the one past the helper coroutines below).
--
-- Lua 5.2 and later run the leader in C (core.run: lua_pcallk, and on 5.4
-- the frame closes the coroutine's guard, so that coroutine.close abandons
-- a leader suspended in fn). LuaJIT and 5.1 run it here, over acquire and
-- finish; on 5.1, where a yield can't cross pcall, fn runs in a helper
-- coroutine whose yields are passed up to the caller's scheduler.

local core = require "singleflight.core"
local panic = require "singleflight.panic"

local rawget, setmetatable, xpcall = rawget, setmetatable, xpcall
local co_create, co_resume, co_running, co_status, co_yield =
      coroutine.create, coroutine.resume, coroutine.running, coroutine.status,
      coroutine.yield
local traceback = debug.traceback
local handler, is_panic = panic.handler, panic.is_panic
local acquire, finish, COUNT = core.acquire, core.finish, core.COUNT

local DONE, PANICKED, DELIVER, DONE_GONE, PANICKED_GONE = 0, 6, 7, 9, 10

local M = {}
local LUA51 = _VERSION == "Lua 5.1" and not rawget(_G, "jit")

M.running = co_running

-- What the leader's protected fn gave, as the statuses of core.run.
local function settled(c, key, ok, v, err)
  if ok then
    local shared, nlocal, expired = finish(c, true, v, err)
    if nlocal > 0 then
      return expired and DONE_GONE or DELIVER, v, err, shared, c
    end
    return DONE, v, err, shared
  end
  local value, tb = v, ""
  if is_panic(v) then -- the handler's; a bare value if it failed itself
    value, tb = v.value, v.traceback
  end
  local _, nlocal, expired = finish(c, false, value, tb)
  return expired and PANICKED_GONE or PANICKED, value, tb,
         nlocal > 0 and c or nil, key
end

local protect
if not LUA51 then
  protect = function(_, fn, ...)
    return xpcall(fn, handler, ...)
  end
else
  -- helper -> the coroutine that runs it (false: the main one)
  local parent51 = setmetatable({}, { __mode = "kv" })
  local getinfo = debug.getinfo
  local alias, guard = core.alias, core.guard

  -- True when co's stack holds a C function that called back into Lua
  -- (pcall, table.sort, a metamethod, ...): 5.1 can't yield across it.
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
  local function yieldable51(co)
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
  M.yieldable51 = yieldable51

  local function step(co, ok, ...)
    if co_status(co) == "dead" then
      if ok then
        return true, ...
      end
      local tb = traceback(co, "")
      if tb:sub(1, 1) == "\n" then
        tb = tb:sub(2)
      end
      return false, panic.new((...), tb)
    end
    local outer = co_running()
    if outer == nil then
      return false, panic.new("attempt to yield from outside a coroutine")
    elseif not yieldable51(outer) then
      return false, panic.new("attempt to yield across metamethod/C-call boundary")
    end
    return step(co, co_resume(co, co_yield(...)))
  end

  -- coroutine.create takes only Lua functions; fn may be a C function or
  -- a callable value
  local function body(fn, ...)
    return fn(...)
  end

  -- gd: the guard whose calls fn runs for (its recursion is theirs)
  protect = function(gd, fn, ...)
    local co = co_create(body)
    if gd == true then
      gd = guard()
    end
    if gd then
      alias(co, gd)
    end
    parent51[co] = co_running() or false
    return step(co, co_resume(co, fn, ...))
  end

  M.running = function()
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

M.protect = function(fn, ...)
  return protect(nil, fn, ...)
end

if core.run then
  M.run, M.rerun = core.run, core.rerun
  M.run_local, M.rerun_local = core.run_local, core.rerun_local
  M.lead = function(_, c, key, fn, ...)
    return core.lead(c, key, fn, ...)
  end
else
  -- Its frame is the leader's while fn runs: the sweep of flow.lua looks
  -- for it (and for the call, its second argument).
  local lead
  if LUA51 then
    lead = function(_, c, key, fn, ...)
      return settled(c, key, protect(true, fn, ...))
    end
  else
    lead = function(_, c, key, fn, ...)
      return settled(c, key, xpcall(fn, handler, ...))
    end
  end
  M.lead = lead
  local function runner(flags)
    return function(g, key, fn, ...)
      local st, c, gd, skey = acquire(g, key, fn, "call", flags)
      if st ~= 0 then
        return st, c, gd, skey
      end
      return lead(g, c, skey, fn, ...)
    end
  end
  -- (DEEPER: errors blame the caller of call, past this frame)
  local DEEPER, LOCAL = core.DEEPER, core.LOCAL
  M.run, M.rerun = runner(COUNT + DEEPER), runner(DEEPER)
  M.run_local, M.rerun_local = runner(COUNT + LOCAL + DEEPER), runner(LOCAL + DEEPER)
end

return M
