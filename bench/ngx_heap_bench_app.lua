--- The nginx side of bench/nginx_heap_bench.lua: one worker that holds a
-- big Lua heap, slow calls with waiters, and an unrelated location (/ping).
-- The slow calls go through singleflight (mode=sf) or through a lean
-- singleflight in plain Lua on ngx.semaphore (mode=plain), the baseline:
-- whatever /ping suffers beyond the baseline's is the library's doing.
local singleflight = require "singleflight"
local route = require "ngx_route"
local semaphore = require "ngx.semaphore"

local ngx = rawget(_G, "ngx")
local pcall, error = pcall, error

local heap = {}
local execs = { sf = 0, plain = 0 }

-- The baseline: a table of the calls in flight, a semaphore per call; the
-- leader runs fn and posts once per waiter.
local plain = { calls = {} }

function plain:call(key, fn)
  local c = self.calls[key]
  if c then
    c.waiters = c.waiters + 1
    local ok, err = c.sema:wait(60)
    if not ok then
      return nil, err
    end
    if not c.ok then
      error(c.v, 0)
    end
    return c.v, nil, true
  end
  c = { sema = semaphore.new(), waiters = 0 }
  self.calls[key] = c
  c.ok, c.v = pcall(fn)
  self.calls[key] = nil
  c.sema:post(c.waiters)
  if not c.ok then
    error(c.v, 0)
  end
  return c.v, nil, c.waiters > 0
end

local groups = { sf = singleflight.new(), plain = plain }

local handlers = {}

--- Grows the heap by ?n= small tables (objects to walk, which is what
-- makes a full collection slow) and says its size.
function handlers.grow(args)
  for i = 1, tonumber(args.n) do
    heap[#heap + 1] = { i }
  end
  ngx.say("kb=", math.floor(collectgarbage("count")), "\ntables=", #heap)
end

--- A call of ?key= through ?mode= whose fn waits ?secs= on its backend.
function handlers.slow(args)
  local mode = args.mode
  local g = assert(groups[mode], "mode: sf or plain")
  local v, _, shared = g:call(args.key, function()
    execs[mode] = execs[mode] + 1
    ngx.sleep(tonumber(args.secs))
    return "v"
  end)
  ngx.say("value=", tostring(v), "\nshared=", tostring(shared))
end

--- The executions so far of ?mode=.
function handlers.execs(args)
  ngx.say("n=", execs[args.mode])
end

function handlers.ping()
  ngx.say("pong")
end

local app = {}

app.content = route(handlers)

return app
