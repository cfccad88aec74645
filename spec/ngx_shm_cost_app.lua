--- The application of spec/48-shm_cost_spec.lua: what a call of a group
-- with shm costs the worker in the common case (it leads the key, and no
-- other worker waits on it): shared-dict operations, timers started and
-- values encoded, counted by wrapping the dicts' methods, ngx.timer.at
-- and the group's codec.
local singleflight = require "singleflight"
local route = require "ngx_route"

local ngx = rawget(_G, "ngx")

local counts = { ops = 0, timers = 0, encoded = 0 }

-- every lua_shared_dict shares its methods: each call counts one operation
local methods = getmetatable(ngx.shared.sf).__index
for name, f in pairs(methods) do
  if type(f) == "function" then
    methods[name] = function(...)
      counts.ops = counts.ops + 1
      return f(...)
    end
  end
end

local timer_at = ngx.timer.at
ngx.timer.at = function(...)
  counts.timers = counts.timers + 1
  return timer_at(...)
end

local group = singleflight.new { shm = "sf", codec = {
  encode = function(v)
    counts.encoded = counts.encoded + 1
    return v
  end,
  decode = function(bytes)
    return bytes
  end,
} }

local handlers = {}

--- n calls, each on a key of its own (prefix .. i), each leading: what
-- they cost, the first call's aside (it may start what lives on, as the
-- timer that renews leases), and the instance's counters before and after.
function handlers.leads(args)
  local n, prefix = tonumber(args.n), args.prefix
  local function fn(i)
    ngx.sleep(0.001) -- a cosocket's yield, as any loader's
    return "value " .. i
  end
  group:call(prefix .. "warm", fn, 0)
  local before = group:stats()
  local c0 = { ops = counts.ops, timers = counts.timers, encoded = counts.encoded }
  for i = 1, n do
    assert(group:call(prefix .. i, fn, i) == "value " .. i)
  end
  local ops, timers, encoded =
    counts.ops - c0.ops, counts.timers - c0.timers, counts.encoded - c0.encoded
  local after = group:stats()
  ngx.say("ops=", ops, "\ntimers=", timers, "\nencoded=", encoded,
          "\ncalls=", after.calls - before.calls,
          "\nexecutions=", after.executions - before.executions,
          "\nleads=", after.leads - before.leads, "\ninflight=", after.inflight)
end

local app = { content = route(handlers) }

return app
