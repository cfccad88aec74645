--- singleflight.runner: the leader's frame, the one place where the Lua
-- versions differ in running fn.
--
--   leader(settle) -> lead(group, call, guard, tbc, key, fn, ...)
--     runs fn(...) protected, then returns settle(guard, call, key, ok, ...);
--     its frame keeps the group's handle alive while fn runs.
--     On Lua 5.4 the frame closes `tbc` (the leader's guard, in a coroutine),
--     so that coroutine.close abandons a leader suspended inside fn.
--     On Lua 5.1, where a yield can't cross pcall, fn runs in a helper
--     coroutine whose yields are passed up to the caller's scheduler.
--   protect(fn, ...) -> true, v, err | false, panic: fn run protected, on
--     its own (a caller that gave up waiting and runs fn unshared).
--   running() -> the coroutine the caller's scheduler resumes (on 5.1,
--     the one past those helpers).

local core = require "singleflight.core"
local panic = require "singleflight.panic"

local load, rawget, setmetatable, xpcall = load, rawget, setmetatable, xpcall
local co_create, co_resume, co_running, co_status, co_yield =
      coroutine.create, coroutine.resume, coroutine.running, coroutine.status,
      coroutine.yield
local traceback = debug.traceback
local handler = panic.handler

local M = {}
local LUA51 = _VERSION == "Lua 5.1" and not rawget(_G, "jit")

M.running = co_running

if not LUA51 then
  M.protect = function(fn, ...)
    return xpcall(fn, handler, ...)
  end
end

if core.closes then
  -- the to-be-closed variable is Lua 5.4 syntax: compiled here, on 5.4 only
  local make = load([[
    local settle, xpcall, handler = ...
    return function(_, c, gd, tbc, key, fn, ...)
      local _ <close> = tbc
      return settle(gd, c, key, xpcall(fn, handler, ...))
    end]], "=singleflight.runner(5.4)")
  M.leader = function(settle)
    return make(settle, xpcall, handler)
  end
elseif not LUA51 then
  M.leader = function(settle)
    return function(_, c, gd, _, key, fn, ...)
      return settle(gd, c, key, xpcall(fn, handler, ...))
    end
  end
else
  -- helper -> the coroutine that runs it (false: the main one)
  local parent51 = setmetatable({}, { __mode = "kv" })
  local getinfo = debug.getinfo
  local alias = core.alias

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

  local function protect(gd, fn, ...)
    local co = co_create(body)
    if gd then
      alias(co, gd)
    end
    parent51[co] = co_running() or false
    return step(co, co_resume(co, fn, ...))
  end

  M.leader = function(settle)
    return function(_, c, gd, _, key, fn, ...)
      return settle(gd, c, key, protect(gd, fn, ...))
    end
  end
  M.protect = function(fn, ...)
    return protect(nil, fn, ...)
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

return M
