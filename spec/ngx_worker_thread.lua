-- What ngx.run_worker_thread runs for spec/40-openresty_spec.lua: a call on
-- the process-wide group "worker_thread", from a Lua state of nginx's
-- thread pool (an OS thread of its own, with ngx.get_phase but neither
-- timers nor sleep).
local M = {}

function M.dup(key)
  local g = require("singleflight").group("worker_thread")
  local v, err, shared = g:call(key, function()
    return "thread"
  end)
  return v, tostring(err), shared
end

return M
