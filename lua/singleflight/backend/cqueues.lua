--- singleflight backend "cqueues": duplicates wait on a cqueues.condition.
--
-- A duplicate waits in a coroutine managed by a cqueues controller
-- (cq:wrap); the leader signals the condition as soon as it is done, so
-- the controller resumes the waiters on its next step. g:start spawns the
-- leader with the running controller's wrap.

local cqueues = require "cqueues"
local condition = require "cqueues.condition"

local running = cqueues.running
local error = error
local co_running, co_isyieldable = coroutine.running, coroutine.isyieldable

local backend = { name = "cqueues" }

--- One condition variable per in-flight call.
function backend.new()
  return condition.new()
end

--- Blocks the running cqueues coroutine until signalled or `secs` pass.
function backend.wait(cond, secs)
  if secs then
    cond:wait(secs)
  else
    cond:wait()
  end
end

--- Wakes the `n` coroutines waiting on `cond` (never yields).
function backend.wake(cond, n)
  cond:signal(n)
end

--- True inside a coroutine of a running cqueues controller. A coroutine
-- nested in a cqueues thread can wait too, when its yields reach the
-- controller (cqueues.auxlib.resume, or the helper coroutine singleflight
-- runs fn in on Lua 5.1): cqueues' own rule for any call that blocks.
function backend.can_wait()
  local cq = running()
  if not cq then
    return false, "not inside a running cqueues controller"
  end
  local co, main = co_running()
  if co == nil or main then
    return false, "the main coroutine cannot wait"
  end
  if co_isyieldable and not co_isyieldable() then
    return false, "the running coroutine cannot yield here"
  end
  return true
end

--- Runs fn(...) in a new coroutine of the running controller.
function backend.spawn(fn, ...)
  local cq = running()
  if not cq then
    error("singleflight: start with the cqueues backend needs a running "
          .. "cqueues controller", 3)
  end
  cq:wrap(fn, ...)
end

return backend
