--- A singleflight in plain Lua: the baseline of the benchmarks.
--
-- A table maps each key in flight to a table for its call. The first caller
-- runs fn under pcall; callers that arrive meanwhile yield until the leader
-- has stored the results in the call's table. Same results as the module
-- (v, err, shared), errors re-raised to every caller, no C.

local error, pcall, setmetatable = error, pcall, setmetatable
local yield = coroutine.yield

local Plain = {}
Plain.__index = Plain

function Plain:call(key, fn, ...)
  local calls = self.calls
  local c = calls[key]
  if c then
    c.dups = c.dups + 1
    repeat
      yield()
    until c.done
    if not c.ok then
      error(c.v, 0)
    end
    return c.v, c.err, true
  end
  c = { dups = 0 }
  calls[key] = c
  local ok, v, err = pcall(fn, ...)
  calls[key] = nil
  local shared = c.dups > 0
  if shared then -- someone waits: leave the results in the call's table
    c.done, c.ok, c.v, c.err = true, ok, v, err
  end
  if not ok then
    error(v, 0)
  end
  return v, err, shared
end

local M = {}

function M.new()
  return setmetatable({ calls = {} }, Plain)
end

return M
