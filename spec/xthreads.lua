-- Helpers for the specs that run Lua states in OS threads (module sfthreads,
-- built from ctest/sfthreads.c next to singleflight.core).
local X = {}

local ok, T = pcall(require, "sfthreads")
X.available = ok
X.T = ok and T or nil

-- Hang guards: generous, only there so that a bug fails instead of hanging.
X.GUARD = tonumber(os.getenv("SINGLEFLIGHT_HANG_GUARD")) or 60

local names = 0
--- A group name no other spec uses.
function X.name(what)
  names = names + 1
  return string.format("spec:%s:%d:%s", what, names, tostring({}):match("0x%x+") or "")
end

-- Every chunk starts with this: the module, the helper and a poll helper.
X.PRELUDE = [[
local singleflight = require "singleflight"
local T = require "sfthreads"
local GUARD = ]] .. X.GUARD .. [[

local function wait_until(pred, what)
  local slept = 0
  while not pred() do
    if slept > GUARD then error("hang guard: " .. (what or "condition"), 2) end
    T.sleep(0.0005)
    slept = slept + 0.0005
  end
end
]]

-- dump(v): a canonical text of a value, the same in every state for equal
-- copies: tables numbered in visiting order (keys sorted), so that a cycle
-- or a shared subtable shows as a back reference "@n"; integer and float
-- told apart where Lua has both; "M" marks a table with a metatable.
X.DUMP = [[
local dump
do
  local mtype = math.type or function() return "n" end
  local order = { boolean = 1, number = 2, string = 3, table = 4, userdata = 5 }
  local function before(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return (order[ta] or 9) < (order[tb] or 9) end
    if ta == "number" or ta == "string" then return a < b end
    if ta == "boolean" then return (not a) and b end
    return tostring(a) < tostring(b)
  end
  local function go(v, seen, n)
    local t = type(v)
    if t == "table" then
      if seen[v] then return "@" .. seen[v] end
      n[1] = n[1] + 1
      seen[v] = n[1]
      local keys, parts = {}, {}
      for k in pairs(v) do keys[#keys + 1] = k end
      table.sort(keys, before)
      for i, k in ipairs(keys) do
        parts[i] = go(k, seen, n) .. "=" .. go(v[k], seen, n)
      end
      return "#" .. seen[v] .. "{" .. table.concat(parts, ",") .. "}"
        .. (getmetatable(v) and "M" or "")
    elseif t == "number" then
      return mtype(v) .. ":" .. string.format("%.17g", v)
    elseif t == "string" then
      return string.format("%q", v)
    end
    return t .. ":" .. tostring(v)
  end
  dump = function(v) return go(v, {}, { 0 }) end
end
]]

--- Runs `src` (after the prelude) in a new thread with the arguments.
function X.spawn(src, ...)
  return T.spawn(X.PRELUDE .. src, ...)
end

X.unpack = table.unpack or unpack -- luacheck: ignore 143

function X.pack(...)
  return { n = select("#", ...), ... }
end

--- Joins a thread; raises its error; returns its results.
function X.join(t)
  local r = X.pack(t:join(X.GUARD))
  if not r[1] then
    error("thread failed: " .. tostring(r[2]), 2)
  end
  return X.unpack(r, 2, r.n)
end

--- Joins every thread of a list; returns a list of first results.
function X.join_all(ts)
  local out = {}
  for i, t in ipairs(ts) do
    local r = { t:join(X.GUARD) }
    if not r[1] then
      error("thread " .. i .. " failed: " .. tostring(r[2]), 2)
    end
    out[i] = r[2]
  end
  return out
end

--- Polls pred() until it is true, with a hang guard.
function X.wait_until(pred, what)
  local slept = 0
  while not pred() do
    if slept > X.GUARD then
      error("hang guard: " .. (what or "condition"), 2)
    end
    T.sleep(0.0005)
    slept = slept + 0.0005
  end
end

return X
