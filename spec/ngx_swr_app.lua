-- The application of spec/44-openresty_swr_spec.lua: the README's
-- stale-while-revalidate recipe (swr.lua) over an origin that counts its
-- calls and, while its gate is shut, holds them.
local swr = require "swr"

local M = {}

local calls, running, gate_open = 0, 0, true

local function origin(key)
  calls = calls + 1
  running = running + 1
  local n = calls
  for _ = 1, 500 do -- 5 s at most
    if gate_open then
      break
    end
    ngx.sleep(0.01)
  end
  running = running - 1
  return key .. "-v" .. n
end

local handlers = {}

function handlers.get(args)
  local v = swr.get(args.key, origin, tonumber(args.ttl))
  ngx.say("value=", tostring(v), "\ncalls=", calls, "\nrunning=", running)
end

local group = require("singleflight").new()

--- Starts ?key= with g:start or g:start_detached (?kind=), fn held at the
-- gate, and answers at once.
function handlers.start(args)
  local f = group[args.kind](group, args.key, origin, args.key)
  ngx.say("started=", tostring(f ~= nil))
end

function handlers.gate(args)
  gate_open = args.open == "1"
  ngx.say("open=", tostring(gate_open))
end

function handlers.origin()
  ngx.say("calls=", calls, "\nrunning=", running)
end

M.content = require("ngx_route")(handlers)

return M
