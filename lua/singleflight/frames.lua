--- Leader frames on a coroutine's stack: how OpenResty's leaders are told
-- alive from gone.
--
-- nginx may end a request by killing its coroutines, or reset a coroutine
-- and hand it to a later request, without unwinding its frames: no
-- finalizer runs, no __close. A lead counts only while a frame of the
-- function that runs it is still on its coroutine's stack and holds the
-- lead's own record among its locals (compared as a value: no local's name
-- or position is load-bearing). This is the one walker; flow.lua asks it
-- of a call, shm.lua of a lead across workers.

local getinfo, getlocal = debug.getinfo, debug.getlocal
local co_running = coroutine.running

local M = {}

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

return M
