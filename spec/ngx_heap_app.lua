-- The application of spec/43-openresty_heap_spec.lua: a worker that holds
-- a big Lua heap, slow leaders with waiters, and an unrelated location.
local singleflight = require "singleflight"

local M = {}

local heap = {}
local group = singleflight.new()

local handlers = {}

--- Grows the heap by ?n= small tables (what makes a full collection slow:
-- objects to walk, not bytes).
function handlers.grow(args)
  for i = 1, tonumber(args.n) do
    heap[#heap + 1] = { i }
  end
  ngx.say("kb=", math.floor(collectgarbage("count")))
end

--- A call of ?key= whose fn waits ?secs= on its backend.
function handlers.slow(args)
  local v, _, shared = group:call(args.key, function()
    ngx.sleep(tonumber(args.secs))
    return "v"
  end)
  ngx.say("value=", tostring(v), "\nshared=", tostring(shared))
end

function handlers.ping()
  ngx.say("pong")
end

M.content = require("ngx_route")(handlers)

return M
