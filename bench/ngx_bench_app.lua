--- The nginx side of bench/nginx_bench.lua: one key, a backend of
-- `backend` seconds (ngx.sleep), through a group over a lua_shared_dict
-- (mode=shm) or a group per worker (mode=worker). Each answer says whether
-- its request led, and how long after the end of the backend call it
-- shared its request got the result (CLOCK_MONOTONIC, which every worker
-- shares).
local singleflight = require "singleflight"

local ngx = rawget(_G, "ngx")
local clock = singleflight._core.now
local fmt = string.format

local groups = {
  shm = singleflight.new { shm = "bench_sf" },
  worker = singleflight.new(),
}

local app = {}

function app.content()
  local args = ngx.req.get_uri_args()
  local g = assert(groups[args.mode], "mode: shm or worker")
  local secs = tonumber(args.backend) or 0.1
  local led = false
  local ended = g:call(args.key, function()
    led = true
    ngx.sleep(secs)
    return clock()
  end)
  ngx.say("led=", tostring(led), "\nover_ms=", fmt("%.3f", (clock() - ended) * 1000),
          "\npid=", ngx.worker.pid())
end

return app
