-- The application the OpenResty specs talk to over HTTP (nginx_server.lua
-- starts nginx with it; 40-openresty_spec.lua drives it). One worker, so
-- module-level state is shared by every request. Each handler answers
-- with lines of key=value.
local singleflight = require "singleflight"
local ngx_backend = require "singleflight.backend.ngx"

local ngx = ngx
local concat, tostring = table.concat, tostring

local app = {}

-- Counts the ngx backend's waits: a duplicate that is woken by the leader
-- waits once; one that polled would come back for more.
local waits = 0
do
  local wait = ngx_backend.wait
  ngx_backend.wait = function(sema, secs)
    waits = waits + 1
    return wait(sema, secs)
  end
end

local groups = {
  stampede = singleflight.new(),
  panic = singleflight.new(),
  abort = singleflight.new { timeout = 30 },
  phase = singleflight.new(),
  start = singleflight.new(),
  -- three handles on one process-wide group, each with its own options
  slow = singleflight.group("slow"),
  slow_error = singleflight.group("slow", { timeout = 0.1 }),
  slow_run = singleflight.group("slow", { timeout = 0.1, on_timeout = "run" }),
}

local function reply(t)
  local out = {}
  for k, v in pairs(t) do
    out[#out + 1] = k .. "=" .. tostring(v)
  end
  table.sort(out)
  ngx.say(concat(out, "\n"))
end

local function now()
  ngx.update_time()
  return ngx.now()
end

-- The spec's barrier: sleeps until pred() or `secs` pass (not the
-- library's waiting, which never polls).
local function sleep_until(pred, secs)
  local deadline = now() + secs
  while not pred() and now() < deadline do
    ngx.sleep(0.005)
  end
  return pred()
end

local handlers = {}

--- n requests on one key: the leader holds on until the other n-1 joined
-- (or 10 s pass: then the spec sees more than one leader).
function handlers.stampede(args)
  local g, n = groups.stampede, tonumber(args.n)
  local led = false
  local v, err, shared = g:call("stampede", function()
    led = true
    local base = g:stats().shared
    sleep_until(function() return g:stats().shared >= base + n - 1 end, 10)
    return { value = "fresh " .. g:stats().executions, at = now() }, "second"
  end)
  reply {
    led = led, value = v.value, err = err, shared = shared,
    gap_ms = (now() - v.at) * 1000,
  }
end

--- n requests on one key whose leader raises a table.
function handlers.panic(args)
  local g, n = groups.panic, tonumber(args.n)
  local ok, e = pcall(g.call, g, "panic", function()
    local base = g:stats().shared
    sleep_until(function() return g:stats().shared >= base + n - 1 end, 10)
    error({ code = 42 })
  end)
  reply {
    ok = ok, is_panic = singleflight.is_panic(e),
    code = type(e) == "table" and type(e.value) == "table" and e.value.code,
    value_id = type(e) == "table" and tostring(e.value),
    text = tostring(e):sub(1, 14), key = type(e) == "table" and e.key,
  }
end

--- The leader of "slow": runs until ?timeouts=N duplicates timed out.
function handlers.slow_leader(args)
  local g = groups.slow
  local want = tonumber(args.timeouts)
  local v, err, shared = g:call("slow", function()
    sleep_until(function() return g:stats().timeouts >= want end, 10)
    return "leader"
  end)
  reply { value = v, err = err, shared = shared }
end

--- A duplicate of "slow" with a timeout: ?mode=error or ?mode=run.
function handlers.slow_dup(args)
  local g = args.mode == "run" and groups.slow_run or groups.slow_error
  local v, err, shared = g:call("slow", function() return "own" end)
  reply { value = v, err = err, shared = shared }
end

--- The leader of "abort": sleeps until its client goes away.
function handlers.abort_leader()
  groups.abort:call("abort", function()
    ngx.sleep(20)
    return "first"
  end)
  reply { value = "first" }
end

--- A duplicate of "abort": if it becomes the leader, it takes a moment.
function handlers.abort_dup()
  local led = false
  local v, err, shared = groups.abort:call("abort", function()
    led = true
    ngx.sleep(0.05)
    return "second"
  end)
  reply { value = v, err = err, shared = shared, led = led }
end

--- Go's TestDoChan, in a request.
function handlers.start()
  local g = groups.start
  local f = g:start("start", function(x)
    return "bar" .. x, nil
  end, "!")
  local v, err, shared = f:wait(5)
  reply { value = v, err = err, shared = shared, ready = f:ready() }
end

--- The future started from the log phase of /start_from_log (a timer).
function handlers.start_check()
  local f = app.log_future
  if not f then
    return reply { missing = true }
  end
  local v, err = f:wait(5)
  reply { value = v, err = err }
end

--- A leader for the phase probe: holds "phase" for a moment.
function handlers.phase_leader()
  local v = groups.phase:call("phase", function()
    ngx.sleep(0.3)
    return "leader"
  end)
  reply { value = v }
end

function handlers.stats(args)
  local st = (groups[args.group or ""] or groups.stampede):stats()
  st.waits = waits
  st.finished = app.finished_leaders
  reply(st)
end

function handlers.reset_waits()
  waits = 0
  reply { waits = waits }
end

function handlers.gc()
  local before = collectgarbage("count")
  for _ = 1, 4 do
    collectgarbage("collect")
  end
  reply { kb_before = before, kb_after = collectgarbage("count") }
end

function app.content()
  local name = ngx.var.uri:match("^/([%w_]+)$")
  local h = name and handlers[name]
  if not h then
    ngx.status = 404
    return reply { error = "no handler" }
  end
  h(ngx.req.get_uri_args())
end

--- The log phase of /abort_leader: nginx is done with the request (an
-- aborted one too).
app.finished_leaders = 0
function app.finished()
  app.finished_leaders = app.finished_leaders + 1
end

--- header_filter can't yield: a duplicate there gets the clear error.
function app.header_filter()
  local g = groups.phase
  local ok, e = pcall(g.call, g, "phase", function() return "header_filter" end)
  ngx.header["X-Ok"] = tostring(ok)
  ngx.header["X-Err"] = tostring(e):sub(1, 300)
end

--- log can't yield either: g:start spawns its leader in a timer.
function app.log()
  app.log_future = groups.start:start("from-log", function()
    ngx.sleep(0.01)
    return "via timer in phase " .. ngx.get_phase()
  end)
end

--- A safety net: the worker exits by itself after `secs`, should the
-- spec run die before it stops nginx.
function app.init_worker(secs)
  ngx.timer.at(secs, function()
    os.exit(0)
  end)
end

return app
