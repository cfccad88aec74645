--- The floor of a singleflight over the C core: plain.lua's flow, with the
-- in-flight calls kept by the core instead of a Lua table.
--
-- The leader acquires the key in the core, runs fn under pcall and
-- finishes the call; a duplicate joins the call in the core, yields until
-- the leader has stored the results, and gives its reference back. Only
-- what any Lua layer over the core must do: no recursion check, no
-- abandonment, no timeouts, no argument checks past the core's own. What
-- g:call costs above this is the Lua layer's; what this costs above
-- plain.lua is the price of keeping the calls in C.

local core = require "singleflight.core"

local error, pcall, setmetatable = error, pcall, setmetatable
local yield = coroutine.yield
local enter, finish, release = core.enter, core.finish, core.release

local Floor = {}
Floor.__index = Floor

function Floor:call(key, fn, ...)
  local g, flights = self.g, self.flights
  local st, c, ref = enter(g, key, fn)
  if st == 1 then -- joined
    local fl = flights[c]
    if not fl then
      fl = {}
      flights[c] = fl
    end
    repeat
      yield()
    until fl.done
    release(ref)
    if not fl.ok then
      error(fl.v, 0)
    end
    return fl.v, fl.err, true
  end
  local ok, v, err = pcall(fn, ...)
  local shared, nlocal = finish(c, ok, v, err)
  if nlocal > 0 then
    local fl = flights[c]
    flights[c] = nil
    fl.done, fl.ok, fl.v, fl.err = true, ok, v, err
  end
  if not ok then
    error(v, 0)
  end
  return v, err, shared
end

local M = {}

function M.new()
  return setmetatable({ g = core.new(), flights = {} }, Floor)
end

return M
