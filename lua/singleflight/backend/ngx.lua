--- singleflight backend "ngx": duplicates wait on an ngx.semaphore.
--
-- Inside OpenResty a duplicate request waits on a semaphore of the call it
-- joined; the leader posts it once when it is done, so every waiter is
-- resumed on the next turn of nginx's event loop, with no polling. Only the
-- phases that may yield can wait: elsewhere (init, init_worker, set,
-- header_filter, body_filter, log, balancer, ssl_client_hello,
-- ssl_session_fetch, ...) a duplicate gets a clear error. g:start runs the
-- leader in a light thread (ngx.thread.spawn) where that is allowed, and in
-- a zero-delay timer elsewhere; init and exit_worker have neither.

local ngx = rawget(_G, "ngx")
if type(ngx) ~= "table" or type(ngx.get_phase) ~= "function" then
  error("singleflight: the ngx backend needs OpenResty (ngx_lua)", 2)
end

local semaphore = require "ngx.semaphore"

local error, pcall, select, tostring = error, pcall, select, tostring
local co_isyieldable = coroutine.isyieldable
local unpack = table.unpack or unpack -- luacheck: ignore 143
local get_phase = ngx.get_phase

-- Phases where ngx_lua lets a coroutine yield (ngx.semaphore's wait,
-- ngx.sleep, cosockets and ngx.thread.spawn are allowed there), on any
-- nginx. ssl_client_hello and ssl_session_fetch are not among them: ngx_lua
-- allows a yield there, but only OpenResty's patched nginx and OpenSSL can
-- pause a handshake for it; with stock ones the yield ends the handshake
-- (the client sees it closed; nginx logs "cannot yield in sess get cb" for
-- the session fetch).
local YIELDABLE = {
  rewrite = true, server_rewrite = true, access = true, content = true,
  timer = true, ssl_cert = true,
}

-- Why a phase can't wait, where there is more to say than that it can't.
local WHY = {
  ssl_client_hello = "the nginx phase 'ssl_client_hello' cannot yield "
    .. "(a yield there ends the TLS handshake unless nginx and OpenSSL carry "
    .. "OpenResty's patches; waiting works in rewrite, access, content, timer "
    .. "and ssl_certificate)",
  ssl_session_fetch = "the nginx phase 'ssl_session_fetch' cannot yield "
    .. "(a yield there fails unless OpenSSL carries OpenResty's patches; "
    .. "waiting works in rewrite, access, content, timer and ssl_certificate)",
}

-- Phases where nginx runs neither light threads nor timers.
local NO_SPAWN = { init = true, exit_worker = true }

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
    return false, WHY[phase]
      or "the nginx phase '" .. tostring(phase) .. "' cannot yield "
         .. "(waiting works in rewrite, access, content, timer and "
         .. "ssl_certificate)"
  end
  if co_isyieldable and not co_isyieldable() then
    return false, "the running coroutine cannot yield here"
  end
  return true
end

-- Runs fn(...) in a zero-delay timer of its own.
local function in_timer(phase, fn, ...)
  local n, args = select("#", ...), { ... }
  -- a timer that fires early because the worker is exiting still runs
  -- fn, so that whoever waits for it gets an answer
  local ok, started, err = pcall(ngx.timer.at, 0, function()
    fn(unpack(args, 1, n))
  end)
  if not ok or not started then
    error("nginx refused a timer in the '" .. tostring(phase) .. "' phase: "
          .. tostring(ok and err or started), 0)
  end
end

local function spawnable(phase)
  if NO_SPAWN[phase] then
    error("nginx runs neither light threads nor timers in the '" .. phase
          .. "' phase", 0)
  end
end

--- Runs fn(...) in a light thread of the current request or timer, or in
-- a timer of its own where light threads are not allowed. Raises a plain
-- message (the caller says what could not be done) where neither works.
function backend.spawn(fn, ...)
  local phase = get_phase()
  spawnable(phase)
  if YIELDABLE[phase] then
    local ok, co, err = pcall(ngx.thread.spawn, fn, ...)
    if not ok or not co then
      error("ngx.thread.spawn failed in the '" .. phase .. "' phase: "
            .. tostring(ok and err or co), 0)
    end
    return
  end
  in_timer(phase, fn, ...)
end

--- Runs fn(...) in a timer of its own, whatever the phase: the request
-- that asked is not held until fn ends (g:start_detached).
function backend.spawn_detached(fn, ...)
  local phase = get_phase()
  spawnable(phase)
  in_timer(phase, fn, ...)
end

return backend
