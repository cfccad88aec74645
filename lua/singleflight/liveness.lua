--- singleflight.liveness: OpenResty's leaders that went away unseen.
--
-- A coroutine that goes away is seen by its guard's finalizer, whenever
-- the collector gets to it (the library never runs a collection itself).
-- OpenResty also ends requests by killing their coroutines (ngx.exit,
-- ngx.exec, a client abort, a killed light thread), with no finalizer:
-- nginx lets go of such a coroutine (core.anchored says so at once, even
-- while the application still holds it), or resets it and hands it to a
-- later request, where it would look like its own leader. So a lead
-- counts only while nginx keeps its coroutine and its frame is on that
-- coroutine's stack, checked where it matters: at a would-be recursion,
-- and by a sweep that a timer runs in every nginx worker where someone
-- waits.
--
-- A lead counts while a frame of the function that runs it is on its
-- coroutine's stack and holds the lead's own record among its locals,
-- compared as a value: no local's name or position is load-bearing. This
-- module has the one walker (holds); flow.lua asks it of a call, shm.lua
-- of a lead across workers.

local core = require "singleflight.core"
local backends = require "singleflight.backends"
local flights = require "singleflight.flights"

local error, next, pcall, rawget, select, tonumber =
      error, next, pcall, rawget, select, tonumber
local getinfo, getlocal = debug.getinfo, debug.getlocal
local co_running = coroutine.running
-- the status Lua itself keeps: OpenResty's coroutine.status reads the
-- bookkeeping of the coroutine's request, which is freed when it ends
local co_status = rawget(coroutine, "_status") or coroutine.status
local abandon, abandon_call, leaders, calls, quote =
      core.abandon, core.abandon_call, core.leaders, core.calls, core.quote
local gone, gone_all, in_flight = flights.gone, flights.gone_all, flights.flights

-- M.sweeping: whether the sweep's timer is armed in this nginx worker
local M = { sweeping = false }

-- The locals a leader frame keeps are few; a frame with more is not one
-- that holds a record past this many.
local MAX_LOCALS = 16

--- Is a frame of one of the functions of `fns` (a set) on co's stack,
-- holding value (or alt, when given) among its locals? co may be the
-- running coroutine.
function M.holds(co, fns, value, alt)
  local running = co == co_running()
  local level = running and 2 or 0 -- (the running one's level 1: this function)
  while true do
    local info
    if running then
      info = getinfo(level, "f")
    else
      info = getinfo(co, level, "f")
    end
    if not info then
      return false
    end
    if fns[info.func] then
      for i = 1, MAX_LOCALS do
        local name, v
        if running then
          name, v = getlocal(level, i)
        else
          name, v = getlocal(co, level, i)
        end
        if name == nil then
          break
        elseif v == value or (alt ~= nil and v == alt) then
          return true
        end
      end
    end
    level = level + 1
  end
end


-- Is a leader frame of call c on co's stack? Leader frames (the Lua ones
-- of LuaJIT, where OpenResty runs) keep the call among their locals: the
-- call itself, or its address (a number) on the FFI's fast path.
local leader_frames = {}
--- fn's frames are leaders' frames: they hold their call among their
-- locals while fn runs (flow.lua and runner.lua register theirs).
function M.leader_frame(fn)
  leader_frames[fn] = true
end
local address = function() end
if rawget(_G, "jit") then
  local okffi, ffi = pcall(require, "ffi")
  if okffi then
    address = function(c)
      return tonumber(ffi.cast("uintptr_t", c))
    end
  end
end

local function led_on(co, c)
  return M.holds(co, leader_frames, c, address(c))
end

-- The running coroutine already leads c (held by guard gd): a recursion,
-- unless that lead is stale, which is then abandoned.
function M.check_recursion(c, gd, skey)
  if not (backends.in_openresty() and not led_on(co_running(), c)) then
    error("singleflight: recursive call for key " .. quote(skey), 0)
  end
  if abandon_call(gd or core.guard(), c) then
    gone(c)
  end
end

local SWEEP_EVERY = 0.5
local anchored, orphans = core.anchored, core.orphans

-- Inside nginx, the table of running coroutines must be there (see
-- core.anchored); said once in the log if it is not.
if backends.in_openresty() and not core.anchors() then
  local ngx = rawget(_G, "ngx")
  ngx.log(ngx.WARN, "singleflight: nginx's table of running coroutines ",
          "(ngx_http_lua_coroutines_key) was not found: a leader whose light ",
          "thread is killed, or whose request ends, is taken over only once ",
          "its coroutine is reset or collected, or by the waiters' timeout ",
          "or max_age")
end

local function gone_all_of(...)
  for i = 1, select("#", ...) do
    gone_all(abandon((select(i, ...))))
  end
end

--- Abandons the calls whose leader is surely gone: its coroutine is dead,
-- nginx let it go (killed, or its request ended: see core.anchored), or
-- its leader frame is no longer on its stack (nginx reset the coroutine
-- and handed it to a later request). Costs a look per leader and a walk
-- of each suspended leader's stack; never a garbage collection. Returns
-- whether any call is still led or waited on in this state.
function M.sweep()
  -- the calls of coroutines nginx let go, collected since or not
  gone_all_of(orphans())
  local list = { leaders() }
  for i = 1, #list, 2 do
    local co, gd = list[i], list[i + 1]
    local status = co_status(co)
    if status == "dead" or anchored(co) == false then
      gone_all(abandon(gd))
    elseif status ~= "running" then
      local led = { calls(gd) }
      for j = 1, #led do
        local c = led[j]
        if not led_on(co, c) and abandon_call(gd, c) then
          gone(c)
        end
      end
    end
  end
  return #list > 0 or next(in_flight) ~= nil
end

local function tick(premature)
  M.sweeping = false
  if not premature and M.sweep() then
    M.watch()
  end
end

--- Arms the sweep in this nginx worker (a timer that re-arms itself while
-- calls are led or waited on here, and stops when none are, so that a Lua
-- state made for one request, with lua_code_cache off, can go).
function M.watch()
  if M.sweeping or not backends.in_openresty() then
    return
  end
  local ok, armed = pcall(rawget(_G, "ngx").timer.at, SWEEP_EVERY, tick)
  M.sweeping = ok and armed and true or false
end

return M
