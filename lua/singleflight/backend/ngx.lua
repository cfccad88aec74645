--- singleflight backend "ngx": duplicates wait on an ngx.semaphore.
--
-- Inside OpenResty a duplicate request waits on a semaphore of the call it
-- joined; the leader posts it once when it is done, so every waiter is
-- resumed on the next turn of nginx's event loop, with no polling. Only the
-- phases that may yield can wait: elsewhere (init, init_worker, set,
-- header_filter, body_filter, log, balancer, ...) a duplicate gets a clear
-- error. g:start runs the leader in a light thread (ngx.thread.spawn) where
-- that is allowed, and in a zero-delay timer elsewhere.

local ngx = rawget(_G, "ngx")
if type(ngx) ~= "table" or type(ngx.get_phase) ~= "function" then
  error("singleflight: the ngx backend needs OpenResty (ngx_lua)", 2)
end

local semaphore = require "ngx.semaphore"

local error, getmetatable, pairs, pcall, rawget, rawset, select, setmetatable,
      tostring, type =
      error, getmetatable, pairs, pcall, rawget, rawset, select, setmetatable,
      tostring, type
local newproxy = rawget(_G, "newproxy")
local co_isyieldable = coroutine.isyieldable
local unpack = table.unpack or unpack -- luacheck: ignore 143
local get_phase = ngx.get_phase

-- Phases where ngx_lua lets a coroutine yield (ngx.semaphore's wait,
-- ngx.sleep, cosockets and ngx.thread.spawn are allowed there).
local YIELDABLE = {
  rewrite = true, server_rewrite = true, access = true, content = true,
  timer = true, ssl_cert = true, ssl_session_fetch = true,
  ssl_client_hello = true,
}

-- ngx.semaphore takes whole milliseconds in a C int: a wait without a
-- limit waits in slices of this many seconds (init.lua loops).
local SLICE = 3600

local backend = { name = "ngx" }

--- One semaphore per in-flight call, with no resources.
function backend.new()
  local sema, err = semaphore.new(0)
  if not sema then
    error("singleflight: cannot make an ngx.semaphore: " .. tostring(err), 0)
  end
  return sema
end

--- Blocks the running light thread until posted or `secs` pass.
function backend.wait(sema, secs)
  if secs == nil or secs > SLICE then
    secs = SLICE
  end
  local ok, err = sema:wait(secs)
  if not ok and err ~= "timeout" then
    error("singleflight: ngx.semaphore wait failed: " .. tostring(err), 0)
  end
end

--- Wakes the `n` waiters at once (post never yields).
function backend.wake(sema, n)
  sema:post(n)
end

--- True in a phase and a coroutine that can yield.
function backend.can_wait()
  local phase = get_phase()
  if not YIELDABLE[phase] then
    return false, "the nginx phase '" .. tostring(phase) .. "' cannot yield "
                  .. "(waiting works in rewrite, access, content, timer and "
                  .. "the yielding ssl phases)"
  end
  if co_isyieldable and not co_isyieldable() then
    return false, "the running coroutine cannot yield here"
  end
  return true
end

--- Runs fn(...) in a light thread of the current request or timer, or in
-- a timer of its own where light threads are not allowed.
function backend.spawn(fn, ...)
  if YIELDABLE[get_phase()] then
    local co, err = ngx.thread.spawn(fn, ...)
    if not co then
      error("singleflight: ngx.thread.spawn failed: " .. tostring(err), 0)
    end
    return
  end
  local n, args = select("#", ...), { ... }
  -- a timer that fires early because the worker is exiting still runs
  -- fn, so that whoever waits for it gets an answer
  local ok, err = ngx.timer.at(0, function()
    fn(unpack(args, 1, n))
  end)
  if not ok then
    error("singleflight: ngx.timer.at failed: " .. tostring(err), 0)
  end
end

--- Ties each coroutine's guard (the record of the calls it leads, see
-- singleflight.core) to the request that uses it; returns claim(), to be
-- called before each acquire, or nil when that can't be done.
--
-- ngx_lua hands the coroutine of a finished request, reset, to a later
-- one. An aborted leader's coroutine is thus never collected, and its
-- guard would keep the call in flight forever: duplicates would hang, and
-- the next request to get that coroutine would be told its key is a
-- recursive call. So a guard belongs to one request at a time: a request
-- that claims a guard left by an earlier request first abandons what that
-- one still led, and when a request's ngx.ctx is collected, the guards it
-- still owns abandon what it still leads. Either way a duplicate takes
-- over, as when a leader's coroutine is collected.
function backend.request_guards(core)
  local guard_of = core.guard
  local mt = type(guard_of) == "function" and getmetatable(guard_of())
  local abandon_all = type(mt) == "table" and mt.__gc
  if type(abandon_all) ~= "function" or not newproxy then
    return nil
  end
  local owner = setmetatable({}, { __mode = "kv" }) -- guard -> request state
  local KEY = {} -- our slot in ngx.ctx

  local function release(state)
    for gd in pairs(state.guards) do
      local o = owner[gd]
      if o == nil or o == state then
        owner[gd] = nil
        abandon_all(gd)
      end
    end
  end

  local function new_state(ctx)
    local state = { guards = setmetatable({}, { __mode = "k" }) }
    local sentinel = newproxy(true)
    getmetatable(sentinel).__gc = function()
      release(state)
    end
    state.sentinel = sentinel
    rawset(ctx, KEY, state)
    return state
  end

  local function get_ctx()
    return ngx.ctx
  end

  return function()
    if get_phase() == "init" then
      return -- no requests yet
    end
    local ok, ctx = pcall(get_ctx)
    if not ok or type(ctx) ~= "table" then
      return -- a phase without ngx.ctx: nothing to tie the guard to
    end
    local state = rawget(ctx, KEY) or new_state(ctx)
    local gd = guard_of()
    local o = owner[gd]
    if o ~= state then
      if o ~= nil then
        abandon_all(gd) -- an earlier request's leftovers
      end
      owner[gd] = state
      state.guards[gd] = true
    end
  end
end

return backend
