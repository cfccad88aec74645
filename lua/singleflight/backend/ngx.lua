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

local error, select, tostring = error, select, tostring
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

-- nginx runs its event loop on the worker's one OS thread: a duplicate of
-- a call led in another Lua state (lua_code_cache off makes one per
-- request) must not block it; it polls, sleeping between looks.
backend.loop = true
backend.sleep = function(secs)
  ngx.sleep(secs)
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

return backend
