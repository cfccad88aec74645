-- demo_fleet_app.lua: the nginx side of `make demo-fleet`
-- (tools/demo_fleet.sh). Each nginx instance stands for one machine of a
-- fleet; they all share one redis-server.
--
--   /stampede   one request of a stampede on ?key=: g:call(key, origin)
--               through the instance's group (?mode=instance: shm only, one
--               execution per instance) or the fleet's (?mode=fleet: shm and
--               redis, one execution for the whole fleet). origin() is the
--               slow backend: it counts itself in Redis (INCR on a counter
--               key of its own, so every instance counts in one place), then
--               takes ORIGIN_MS. The answer says whether this request ran
--               origin and how long after origin's end it got the value.
--   /executions the executions of origin for ?key= so far (the counter)
local singleflight = require "singleflight"

local ngx = ngx

-- lua-resty-redis, as OpenResty ships it or as Debian does (lua-nginx-redis)
local found, redis = pcall(require, "resty.redis")
if not found then
  redis = require "nginx.redis"
end

local app = {}

local COUNTER = "demo:executions:"

local name, redis_port, origin_ms
local per_instance -- shm only: one execution per instance
local fleet -- shm + redis: one execution across the instances
-- a clock every process of the machine shares (CLOCK_MONOTONIC)
local clock = singleflight._core.now

--- One Redis command on a pooled connection.
local function command(cmd, ...)
  local r = redis:new()
  r:set_timeout(1000)
  local ok, err = r:connect("127.0.0.1", redis_port)
  if not ok then
    return nil, err
  end
  local res
  res, err = r[cmd](r, ...)
  if res ~= nil then
    r:set_keepalive(10000, 16)
  else
    r:close()
  end
  return res, err
end

function app.init(settings)
  name = settings.name
  redis_port = settings.redis_port
  origin_ms = settings.origin_ms
end

function app.init_worker()
  per_instance = singleflight.new { shm = "demo_instance", timeout = 5 }
  fleet = singleflight.new {
    shm = "demo_fleet", timeout = 5,
    redis = { port = redis_port, prefix = "demo:sf:", lease = 2 },
  }
end

-- The slow backend.
local function origin(key)
  local _, err = command("incr", COUNTER .. key)
  if err then
    ngx.log(ngx.ERR, "demo: counting an execution in Redis: ", err)
  end
  ngx.sleep(origin_ms / 1000)
  return { ended = clock(), by = name }
end

function app.stampede()
  local key = ngx.var.arg_key or "hot"
  local fleet_mode = ngx.var.arg_mode == "fleet"
  local g = fleet_mode and fleet or per_instance
  local led = false
  local v, err = g:call(key, function()
    led = true
    return origin(key)
  end)
  if type(v) ~= "table" then
    ngx.status = 502
    ngx.say("error=", tostring(err))
    return
  end
  local over = (clock() - v.ended) * 1000
  ngx.say("led=", tostring(led), "\nover_ms=", string.format("%.3f", over),
          "\ninstance=", name, "\nby=", v.by, "\npid=", ngx.worker.pid(),
          "\nfallbacks=", fleet_mode and g:stats().fleet_fallbacks or 0)
end

function app.executions()
  local n, err = command("get", COUNTER .. (ngx.var.arg_key or "hot"))
  if err then
    ngx.status = 502
    ngx.say("error=", err)
    return
  end
  ngx.say("executions=", tonumber(n) or 0)
end

return app
