--- The nginx side of bench/nginx_zipf_bench.lua: a loader as OpenResty
-- users write it. /<mode>?id=<id> answers from a per-worker
-- lua-resty-lrucache (entries live TTL seconds); a miss calls
-- g:call(id, origin, id), whose origin takes ORIGIN seconds (ngx.sleep).
-- mode "worker": a group per worker; mode "shm": a group over the
-- lua_shared_dict "sf". Each mode has a cache of its own, so that one
-- mode's rounds never answer the other's.
--
-- The dict bench_book counts, per mode, the origin's calls and the calls
-- that began while another call of the same id was running in any worker
-- (overlaps). /book answers them, and how many entries of "sf" are not
-- counters (in-flight state).
local singleflight = require "singleflight"
local lrucache = require "resty.lrucache"

local ngx = rawget(_G, "ngx")

local TTL, ORIGIN, IDS = 2, 0.02, 100000

local book = ngx.shared.bench_book

local modes = {}
for name, opts in pairs { worker = {}, shm = { shm = "sf" } } do
  modes[name] = {
    group = singleflight.new(opts),
    cache = assert(lrucache.new(IDS)),
    calls = name .. ":calls",
    overlaps = name .. ":overlaps",
    running = name .. ":running:",
  }
end

local function origin(m, id)
  book:incr(m.calls, 1, 0)
  local mark = m.running .. id
  if not book:add(mark, true, 10) then
    book:incr(m.overlaps, 1, 0)
  end
  ngx.sleep(ORIGIN)
  book:delete(mark)
  return { id = id, at = ngx.now() }
end

local function load(m)
  local id = ngx.var.arg_id
  local cache = m.cache
  local v = cache:get(id)
  if v == nil then
    v = m.group:call(id, origin, m, id)
    cache:set(id, v, TTL)
  end
  ngx.print(v.id)
end

local function show_book()
  local inflight = 0
  for _, k in ipairs(ngx.shared.sf:get_keys(0)) do
    if k:sub(1, 1) ~= "c" then -- c<name>:<ns>: the groups' counters
      inflight = inflight + 1
    end
  end
  local out = { "inflight=", inflight }
  for name, m in pairs(modes) do
    out[#out + 1] = ("\n%s_calls=%d\n%s_overlaps=%d"):format(
      name, book:get(m.calls) or 0, name, book:get(m.overlaps) or 0)
  end
  ngx.say(table.concat(out))
end

local app = {}

function app.content()
  local mode = ngx.var.uri:sub(2)
  local m = modes[mode]
  if m then
    return load(m)
  elseif mode == "book" then
    return show_book()
  end
  return ngx.exit(404)
end

return app
