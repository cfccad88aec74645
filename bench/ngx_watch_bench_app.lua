--- The nginx side of bench/nginx_watch_bench.lua: a group over a
-- lua_shared_dict in several workers, one slow call, and one waiter per
-- worker. The dict bench_book is where the workers' bookkeeping meets:
-- which worker leads, which workers have a waiter, when the leader may
-- end. Every answer says which worker gave it.
local singleflight = require "singleflight"
local route = require "ngx_route"

local ngx = rawget(_G, "ngx")

local group = singleflight.new { shm = "bench_sf" }
local book = ngx.shared.bench_book

local handlers = {}

--- A call of ?key=; the first request leads and its fn lasts until
-- /release (or 60 s). A worker takes one caller of a key: later requests
-- that reach it answer role=extra at once, without calling.
function handlers.watch(args)
  local key, pid = args.key, ngx.worker.pid()
  if not book:add("w:" .. key .. ":" .. pid, true) then
    return ngx.say("role=extra\npid=", pid)
  end
  local led = false
  local v = group:call(key, function()
    led = true
    book:set("leader:" .. key, pid)
    local deadline = ngx.now() + 60
    repeat
      ngx.sleep(0.1) -- the leader's worker only; the bench watches the others
      ngx.update_time()
    until book:get("release:" .. key) or ngx.now() > deadline
    return "v"
  end)
  ngx.say("role=", led and "leader" or "waiter", "\nvalue=", tostring(v), "\npid=", pid)
end

--- Who leads ?key= and which workers have its callers (pids, comma-separated).
function handlers.state(args)
  local prefix = "w:" .. args.key .. ":"
  local pids = {}
  for _, k in ipairs(book:get_keys(0)) do
    if k:sub(1, #prefix) == prefix then
      pids[#pids + 1] = k:sub(#prefix + 1)
    end
  end
  ngx.say("leader=", tostring(book:get("leader:" .. args.key)),
          "\ncallers=", table.concat(pids, ","))
end

--- Lets the leader of ?key= end.
function handlers.release(args)
  book:set("release:" .. args.key, true)
  ngx.say("released=", args.key)
end

local app = {}

app.content = route(handlers)

return app
