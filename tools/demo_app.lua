-- demo_app.lua: the nginx side of `make demo` (tools/demo.sh).
--
--   /upstream   the slow backend: 100 ms a call, and only so many calls at
--               a time (a small database pool, say); the rest queue
--   /without    asks the upstream for every request
--   /with       asks it through a singleflight group: one call per key at
--               a time, shared by every request that arrives meanwhile
--               (one group per worker: a call per key and worker)
--   /with_shm   the same through a group over a lua_shared_dict: one call
--               per key at a time for the whole nginx instance
--   /stampede   one request of a stampede (mode=worker or shm): whether it
--               led, and how long after the upstream call it shared ended
--               it got the answer
--   /stats      upstream calls so far and those running (all workers), and
--               this worker's group
--   /reset      zeroes the counters
local singleflight = require "singleflight"
local semaphore = require "ngx.semaphore"

local ngx = ngx

local app = {}

local UPSTREAM_MS = tonumber(os.getenv("UPSTREAM_MS")) or 100
local UPSTREAM_SLOTS = tonumber(os.getenv("UPSTREAM_SLOTS")) or 10

local counters = ngx.shared.demo
local group -- one per worker, made in init_worker
local group_shm -- over the demo_sf dict: one for the instance
local slots -- the upstream's pool, per worker
-- a clock every worker shares (CLOCK_MONOTONIC)
local clock = singleflight._core.now

function app.init_worker()
  group = singleflight.new { timeout = 5, on_timeout = "run" }
  group_shm = singleflight.new { shm = "demo_sf", timeout = 5, on_timeout = "run" }
  if UPSTREAM_SLOTS > 0 then
    slots = semaphore.new(UPSTREAM_SLOTS)
  end
  -- a safety net: the worker goes away by itself should the demo die
  ngx.timer.at(300, function() os.exit(0) end)
end

function app.upstream()
  counters:incr("upstream_calls", 1, 0)
  counters:incr("upstream_busy", 1, 0)
  local ok = true
  if slots then
    ok = slots:wait(30)
  end
  if ok then
    ngx.sleep(UPSTREAM_MS / 1000)
    if slots then
      slots:post(1)
    end
  end
  counters:incr("upstream_busy", -1, 0)
  if not ok then
    return ngx.exit(503)
  end
  ngx.say("value of ", ngx.var.arg_key, " at ", ngx.now())
end

local function fetch(key)
  local res = ngx.location.capture("/upstream", { args = { key = key } })
  if res.status ~= 200 then
    return nil, "upstream status " .. res.status
  end
  return res.body
end

local function answer(body, err)
  if not body then
    ngx.status = 502
    ngx.say(err)
    return
  end
  ngx.print(body)
end

function app.without()
  answer(fetch(ngx.var.arg_key or "hot"))
end

function app.with()
  local key = ngx.var.arg_key or "hot"
  answer(group:call(key, fetch, key))
end

function app.with_shm()
  local key = ngx.var.arg_key or "hot"
  answer(group_shm:call(key, fetch, key))
end

-- fetch, and when the upstream's answer came
local function fetch_timed(key)
  local body, err = fetch(key)
  return { body = body, ended = clock() }, err
end

function app.stampede()
  local key = ngx.var.arg_key or "hot"
  local g = ngx.var.arg_mode == "shm" and group_shm or group
  local led = false
  local v, err = g:call(key, function()
    led = true
    return fetch_timed(key)
  end)
  if not v or not v.body then
    ngx.status = 502
    ngx.say(err)
    return
  end
  ngx.say("led=", tostring(led), "\nover_ms=",
          string.format("%.3f", (clock() - v.ended) * 1000))
end

function app.stats()
  local st = group:stats()
  ngx.say("upstream_calls=", counters:get("upstream_calls") or 0)
  ngx.say("upstream_busy=", counters:get("upstream_busy") or 0)
  ngx.say("calls=", st.calls, " executions=", st.executions, " shared=", st.shared,
          " timeouts=", st.timeouts)
end

function app.reset()
  counters:set("upstream_calls", 0)
  ngx.say("ok")
end

return app
