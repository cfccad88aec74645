--- What the nginx benchmarks share (nginx_heap_bench.lua,
-- nginx_watch_bench.lua, nginx_keys_bench.lua): a throwaway nginx
-- (spec/nginx_server.lua) serving one bench app of bench/ on a port of its
-- own, and a quantile. Run from the repository root, under LuaJIT with
-- LuaSocket.
package.path = "spec/?.lua;" .. package.path
local ns = require "nginx_server"

local M = { ns = ns }

--- The scale of the counts (arg[1]), and whether this is a smoke run.
function M.scale()
  local scale = tonumber(arg[1] or "1") or 1
  return scale, scale < 0.1
end

--- Runs body(server, port) against nginx serving `app` (a module of
-- bench/) on port, its content handler at every path, then stops nginx,
-- even when body fails. opts.workers, opts.init_worker as in
-- nginx_server.start (body starts once every worker runs); opts.dicts,
-- lua_shared_dicts { name = size }; opts.reuseport spreads the
-- connections over the workers. Where nginx with the Lua module can't run,
-- says on stderr why the benchmark `what` is skipped, and runs nothing.
function M.main(what, app, opts, body)
  local found, why = ns.find()
  if not found then
    io.stderr:write("bench: ", what, " skipped: ", why, "\n")
    return
  end
  local http = {}
  for name, size in pairs(opts.dicts or {}) do
    http[#http + 1] = ("  lua_shared_dict %s %s;\n"):format(name, size)
  end
  local server = assert(ns.start(300, {
    workers = opts.workers,
    http = table.concat(http),
    init = ('package.path = "%s/bench/?.lua;" .. package.path\n    require %q')
           :format(found.root, app),
    init_worker = opts.init_worker,
    servers = ([[
  server {
    listen 127.0.0.1:@PORT2@%s;
    location / { content_by_lua_block { require(%q).content() } }
  }
]]):format(opts.reuseport and " reuseport" or "", app),
  }))
  local ok, err = pcall(function()
    if opts.workers then
      ns.eventually(function() return #server.workers() == opts.workers end,
                    "the workers", 10)
    end
    body(server, server.ports[2])
  end)
  server.stop()
  assert(ok, err)
end

--- The q-quantile of the numbers of t (sorts t).
function M.quantile(t, q)
  table.sort(t)
  return t[math.max(1, math.ceil(q * #t))]
end

return M
