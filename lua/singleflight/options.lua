--- singleflight.options: the options of a group handle, checked once, at
-- new and group. A wrong type or an unknown name is an error naming the
-- option; an option's absence is its default.

local backends = require "singleflight.backends"

local error, ipairs, pairs, rawget, tostring, type = error, ipairs, pairs, rawget, tostring, type
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

-- A backend table: the documented fields (backends.FIELDS) only, each of
-- its type; wait and wake are required, and sleep with loop. One of
-- singleflight's own backend modules is taken as it is.
local function check_backend_table(fname, be)
  if backends.is_own(be) then
    return
  end
  local FIELDS = backends.FIELDS
  for k in pairs(be) do
    if not FIELDS[k] then
      option_error(fname, "backend", "unknown field " .. describe(k), 2)
    end
  end
  for _, k in ipairs { "wait", "wake", "new", "can_wait", "spawn", "sleep", "never_fails",
                       "loop", "name" } do
    local v, want = be[k], FIELDS[k]
    local needed = k == "wait" or k == "wake" or (k == "sleep" and be.loop)
    if (v ~= nil or needed) and type(v) ~= want then
      option_error(fname, "backend", sfmt("field '%s': %s expected, got %s%s", k, want,
                                          type(v), k == "sleep" and " (needed with 'loop')"
                                          or ""), 2)
    end
  end
  backends.interpreted(be.wake)
end

-- A backend by name: one that lives in a file of its own is loaded now, so
-- that a scheduler missing here is an error at new, not at the first wait.
local function check_backend_name(fname, v)
  if type(v) ~= "string" or not backends.names[v] then
    option_error(fname, "backend",
                 "one of \"auto\", \"ngx\", \"cqueues\", \"copas\", "
                 .. "\"coroutine\", \"none\" or a table expected, got "
                 .. describe(v), 2)
  end
  local be, why = true, nil
  if v ~= "auto" then -- "auto" is the scheduler running at each wait
    be, why = backends.load(v)
  end
  if not be then
    option_error(fname, "backend", why, 2)
  end
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

-- Redis: a command may not take longer than the lease it renews. (The
-- other settings are redis.check's.)
local function check_redis_lease(fname, given, s)
  if s.timeout > s.lease then
    option_error(fname, "redis", sfmt("field 'timeout': at most the lease (%s s) expected, "
                                      .. "got %s%s", tostring(s.lease), tostring(s.timeout),
                                      given.timeout == nil and " (the default)" or ""), 2)
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
      else
        check_backend_name(fname, v)
      end
      o.backend = v
    elseif k == "shm" then
      check_shm(fname, v)
      o.shm = v
    elseif k == "codec" then
      local c, why = require("singleflight.codec").check(v)
      if not c then
        option_error(fname, "codec", why)
      end
      o.codec = c
    elseif k == "redis" then
      if not backends.in_openresty() then
        option_error(fname, "redis", "needs OpenResty, and shm beside it")
      end
      o.redis = require("singleflight.redis").check(v, fname, 2)
      check_redis_lease(fname, v, o.redis)
    else
      error(sfmt("bad option '%s' to '%s' (unknown option)", tostring(k), fname), 3)
    end
  end
  if opts.on_timeout ~= nil and opts.timeout == nil then
    option_error(fname, "on_timeout", "needs the timeout option: without it a caller "
                 .. "never times out")
  end
  if o.codec and not o.shm then
    option_error(fname, "codec", "needs shm beside it: values cross nginx workers "
                 .. "and machines only with shm")
  end
  if o.redis and not o.shm then
    option_error(fname, "redis", "needs shm beside it: a fleet is deduplicated "
                 .. "within each instance first")
  end
  return o
end

return M
