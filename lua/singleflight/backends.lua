--- singleflight.backends: how a duplicate in the leader's own Lua state
-- waits, by name, and "auto".
--
-- A backend is a table:
--   new()            -> a wait object for one in-flight call (optional)
--   wait(obj, secs)  block the running coroutine until wake(obj) or secs
--                    seconds (nil: no limit); may return early
--   wake(obj, n)     wake the n coroutines waiting on obj; never yields and
--                    creates nothing (it may run inside a finalizer)
--   never_fails      true when wait cannot raise once can_wait said yes
--   can_wait()       -> true, or false and why (optional)
--   spawn(fn, ...)   run fn(...) in a new light thread (optional; start)
--   spawn_detached(fn, ...)
--                    the same, where the thread does not hold the caller's
--                    request (optional; start_detached, which uses spawn
--                    without it)
--   loop             true when the OS thread runs an event loop that a
--                    blocking wait would freeze: a duplicate of a call led
--                    in another Lua state then polls, sleeping with
--   sleep(secs)      yield to the scheduler for secs
--   name             a string, shown in messages (optional)
-- A backend table given as the backend option has these fields and no
-- others (M.FIELDS), checked at new.

local runner = require "singleflight.runner"

local pairs, pcall, rawget, require, tostring, type = pairs, pcall, rawget, require, tostring,
                                                     type
local co_running, co_yield = coroutine.running, coroutine.yield
local co_isyieldable = coroutine.isyieldable
local yieldable51 = runner.yieldable51

local M = {}

-- Can the running coroutine yield to a scheduler that resumes it?
local function in_yieldable_coroutine()
  if co_isyieldable then
    if co_isyieldable() then
      return true
    end
  elseif yieldable51 then
    if yieldable51(co_running()) then
      return true
    end
  else -- 5.2 can't tell: a wait across a C boundary fails, and says so
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
-- loop compiled earlier, and the holders of a collected leader report
-- abandonment from their finalizers: what runs there (the backends' wake
-- among it) stays interpreted. The JIT can't be switched off from inside
-- a finalizer.
M.interpreted = function() end
do
  local jit = rawget(_G, "jit")
  if type(jit) == "table" and type(jit.off) == "function" then
    local jit_off = jit.off
    M.interpreted = function(f)
      -- jit.off() with no function would switch the JIT off everywhere
      if type(f) == "function" then
        pcall(jit_off, f) -- refused for C functions, which need nothing
      end
    end
  end
end

local builtin = {}

builtin.none = {
  name = "none",
  wait = function() end,
  wake = function() end,
  can_wait = function()
    return false, "no backend to wait with (backend \"none\"; see the backend option)"
  end,
}

builtin.coroutine = {
  name = "coroutine",
  -- its can_wait is exact where coroutine.isyieldable exists (5.3 and
  -- later, LuaJIT): then its wait can't fail, and goes unprotected
  never_fails = co_isyieldable ~= nil,
  -- wait is a bare coroutine.yield() and wake does nothing: flow.lua may
  -- yield itself, and count no waiter for wake
  yields = true,
  wait = function()
    co_yield()
  end,
  wake = function() end,
  can_wait = in_yieldable_coroutine,
  sleep = function()
    co_yield()
  end,
}

-- Backends that live in their own files, loaded on first use.
local lazy = { ngx = true, cqueues = true, copas = true }

M.names = { auto = true, ngx = true, cqueues = true, copas = true,
            coroutine = true, none = true }

--- The fields a backend table may have, and the type of each.
M.FIELDS = { new = "function", wait = "function", wake = "function",
             can_wait = "function", spawn = "function", spawn_detached = "function",
             sleep = "function",
             never_fails = "boolean", loop = "boolean", name = "string" }

local function get(name)
  local be = builtin[name]
  if be == nil and lazy[name] then
    be = require("singleflight.backend." .. name)
    M.interpreted(be.wake)
    builtin[name] = be
  end
  return be
end

-- An nginx worker's Lua (its event loop runs timers): not a Lua state of
-- ngx.run_worker_thread, which has ngx.get_phase but neither timers nor
-- sleep, and whose OS thread may block like any other.
local function in_openresty()
  local ngx = rawget(_G, "ngx")
  return type(ngx) == "table" and type(ngx.get_phase) == "function"
         and type(ngx.timer) == "table"
end
M.in_openresty = in_openresty

--- Whether the table be is one of singleflight's own backends (a module
-- singleflight.backend.*, which may hold fields of its own).
function M.is_own(be)
  local loaded = package.loaded
  for name in pairs(lazy) do
    if be == builtin[name] or be == loaded["singleflight.backend." .. name] then
      return true
    end
  end
  return be == builtin.coroutine or be == builtin.none
end

--- The backend name names, loaded if it lives in a file of its own; or
-- nil and why it can't be had here (nothing is left loaded then).
function M.load(name)
  if name == "ngx" and not in_openresty() then
    return nil, "\"ngx\" needs OpenResty (ngx_lua)"
  end
  local ok, be = pcall(get, name)
  if not ok then
    -- the first line of require's message, without where it was raised
    local why = tostring(be):match("^[^\n]*"):gsub("^[^ ]-:%d+: ", "", 1):gsub(":$", "")
    return nil, ("\"%s\" needs the %s library: %s"):format(
      name, name == "ngx" and "ngx.semaphore" or name, why)
  end
  return be
end

-- "auto": the scheduler the caller is running under, if any.
local function auto()
  if in_openresty() then
    return get("ngx")
  end
  local loaded = package.loaded
  local cq = loaded.cqueues
  if type(cq) == "table" and type(cq.running) == "function" and cq.running() then
    return get("cqueues")
  end
  local copas = loaded.copas
  if type(copas) == "table" then
    local be = get("copas")
    if be.can_wait() then
      return be
    end
  end
  return builtin.none
end

--- The backend an option value names (a name, or a backend table).
function M.resolve(spec)
  if spec == "auto" then
    return auto()
  elseif type(spec) == "string" then
    return get(spec)
  end
  return spec
end

--- Why the running coroutine can't wait through be, or nil when it can.
function M.cannot_wait(be)
  if be.can_wait then
    local can, why = be.can_wait()
    if not can then
      return why or "the backend cannot wait here"
    end
  end
  return nil
end

return M
