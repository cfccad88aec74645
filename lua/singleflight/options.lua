--- singleflight.options: the options of a group handle, checked once, at
-- new and group. A wrong type or an unknown name is an error naming the
-- option; an option's absence is its default.

local backends = require "singleflight.backends"

local error, pairs, rawget, tostring, type = error, pairs, rawget, tostring, type
local huge = math.huge
local sfmt = string.format

local M = {}

M.DEFAULTS = { on_timeout = "error", backend = "auto" }

-- Raised from check (level 1) or a function it calls (level 2): blames the
-- caller of new or group.
local function option_error(fname, name, msg, level)
  error(sfmt("bad option '%s' to '%s' (%s)", name, fname, msg), 3 + (level or 1))
end

local function describe(v)
  if type(v) == "number" then
    return tostring(v)
  elseif type(v) == "string" then
    return sfmt("%q", v)
  end
  return type(v)
end

local function check_backend_table(fname, be)
  if type(be.wait) ~= "function" or type(be.wake) ~= "function" then
    option_error(fname, "backend", "a backend table needs functions 'wait' and 'wake'", 2)
  end
  for _, f in pairs { "new", "can_wait", "spawn", "sleep" } do
    if be[f] ~= nil and type(be[f]) ~= "function" then
      option_error(fname, "backend", sfmt("backend field '%s' must be a function", f), 2)
    end
  end
  if be.loop and type(be.sleep) ~= "function" then
    option_error(fname, "backend", "a backend with 'loop' set needs a function 'sleep'", 2)
  end
  backends.interpreted(be.wake)
end

local function seconds(fname, name, v, positive)
  if type(v) ~= "number" or v ~= v or v < 0 or (positive and v == 0) then
    option_error(fname, name, sfmt("%s number expected, got %s",
                                   positive and "positive" or "non-negative",
                                   type(v) == "number" and tostring(v) or type(v)), 2)
  end
  if v ~= huge then
    return v
  end
end

local function check_shm(fname, v)
  if not backends.in_openresty() then
    option_error(fname, "shm", "needs OpenResty: shm names a lua_shared_dict", 2)
  end
  if type(v) ~= "string" then
    option_error(fname, "shm", "string expected, got " .. type(v), 2)
  end
  local shared = rawget(_G, "ngx").shared
  if not (shared and shared[v]) then
    option_error(fname, "shm", sfmt("no lua_shared_dict named %q", v), 2)
  end
end

--- The options table `opts` (argument argn of fname) checked, with the
-- defaults filled in.
function M.check(fname, argn, opts)
  if opts == nil then
    return M.DEFAULTS
  end
  if type(opts) ~= "table" then
    error(sfmt("bad argument #%d to '%s' (table expected, got %s)", argn, fname,
               type(opts)), 3)
  end
  local o = { on_timeout = "error", backend = "auto" }
  for k, v in pairs(opts) do
    if k == "timeout" then
      o.timeout = seconds(fname, "timeout", v)
    elseif k == "max_age" then
      o.max_age = seconds(fname, "max_age", v, true)
    elseif k == "on_timeout" then
      if v ~= "error" and v ~= "run" then
        option_error(fname, "on_timeout",
                     "\"error\" or \"run\" expected, got " .. describe(v))
      end
      o.on_timeout = v
    elseif k == "backend" then
      if type(v) == "table" then
        check_backend_table(fname, v)
      elseif type(v) ~= "string" or not backends.names[v] then
        option_error(fname, "backend",
                     "one of \"auto\", \"ngx\", \"cqueues\", \"copas\", "
                     .. "\"coroutine\", \"none\" or a table expected, got "
                     .. describe(v))
      end
      o.backend = v
    elseif k == "shm" then
      check_shm(fname, v)
      o.shm = v
    elseif k == "redis" then
      if not backends.in_openresty() then
        option_error(fname, "redis", "needs OpenResty, and shm beside it")
      end
      o.redis = require("singleflight.redis").check(v, fname, 2)
    else
      error(sfmt("bad option '%s' to '%s' (unknown option)", tostring(k), fname), 3)
    end
  end
  if o.redis and not o.shm then
    option_error(fname, "redis", "needs shm beside it: a fleet is deduplicated "
                 .. "within each instance first")
  end
  return o
end

return M
