-- The options that only OpenResty can check, checked inside nginx for
-- 16-options_spec.lua: GET /?row=N makes a group with rows[N]'s options
-- and answers ok=true, or ok=false and err=<the error>. GET /?keys=1 gives
-- the shm tier NaN and ±inf keys: <method>_nan=<the error> and
-- inf=<the key of a panic for math.huge>, ninf=<for -math.huge>.
-- Rows: { name, opts, ok, expected } as in 16-options_spec.lua.
local M = {}

M.rows = {
  { "backend ngx", { backend = "ngx" }, true },
  { "redis: timeout longer than the lease", { shm = "sf16", redis = { lease = 1, timeout = 2 } },
    false, { "redis", "field 'timeout': at most the lease (1 s) expected, got 2" } },
  { "redis: the default timeout longer than the lease", { shm = "sf16", redis = { lease = 0.2 } },
    false,
    { "redis", "field 'timeout': at most the lease (0.2 s) expected, got 0.5 (the default)" } },
  { "redis: timeout as long as the lease", { shm = "sf16", redis = { lease = 1, timeout = 1 } },
    true },
  { "redis: the defaults", { shm = "sf16", redis = {} }, true },
  { "shm: on_timeout without timeout", { shm = "sf16", on_timeout = "run" },
    false, { "on_timeout", "needs the timeout option" } },
}

local function keys()
  local singleflight = require "singleflight"
  local g = singleflight.new { shm = "sf16", timeout = 1 }
  for _, method in ipairs { "call", "start", "forget" } do
    local ok, e = pcall(function()
      local r = g[method](g, 0 / 0, print)
      return r
    end)
    ngx.say(method, "_nan=", ok and "accepted" or tostring(e))
  end
  for name, key in pairs { inf = math.huge, ninf = -math.huge } do
    local ok, e = pcall(g.call, g, key, error, "x")
    ngx.say(name, "=", ok and "no panic" or tostring(e.key))
  end
end

function M.content()
  if ngx.var.arg_keys then
    return keys()
  end
  local singleflight = require "singleflight"
  local row = M.rows[tonumber(ngx.var.arg_row)]
  local ok, e = pcall(function()
    local g = singleflight.new(row[2])
    return g
  end)
  ngx.say("ok=", tostring(ok))
  if not ok then
    ngx.say("err=", tostring(e))
  end
end

return M
