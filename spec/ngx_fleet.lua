-- The application of the Redis specs' nginx instances (redis_server.lua
-- starts them; the 45-redis and 47-redis specs drive them over HTTP). /run
-- calls the Redis tier directly: /run?key=&rport=... is one
-- fleet:outcome(key, produce)
-- whose produce appends "key instance pid" to a file shared by the whole
-- fleet (the count of executions), sleeps ?sleep= seconds and returns an
-- outcome encoded by singleflight.core. Each handler answers with lines of
-- key=value.
local core = require "singleflight.core"
local redis_tier = require "singleflight.redis"

local ngx = ngx
local concat, tostring, tonumber = table.concat, tostring, tonumber

local app = {}
local name, count_file

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

-- The wall clock in microseconds, for the gap from the leader's end to a
-- waiter's return (ngx.now has milliseconds only).
local ffi = require "ffi"
ffi.cdef [[
  typedef struct { long tv_sec; long tv_usec; } sf_spec_timeval;
  int gettimeofday(sf_spec_timeval *tv, void *tz);
]]
local tv = ffi.new("sf_spec_timeval")
local function precise_now()
  ffi.C.gettimeofday(tv, nil)
  return tonumber(tv.tv_sec) + tonumber(tv.tv_usec) / 1e6
end

-- One fleet handle per worker and settings (?rport or ?rpath, ?prefix,
-- ?lease, ?password, ?timeout, ?db, ?secret, ?pool_size, ?username, ?ssl=1|0,
-- ?server_name; ?sentinels=host:port,... with ?master_name and
-- ?sentinel_password; ?cluster=host:port,...), for the group ?group (a
-- named group's name; none: the groups of singleflight.new) over this
-- instance's lua_shared_dict fleet_spec.
local fleets, prefixes = {}, {}

-- "host:port,host:port" as a list of nodes, or nil.
local function nodes(list)
  if not list then
    return nil
  end
  local t = {}
  for host, port in list:gmatch("([^,:]+):(%d+)") do
    t[#t + 1] = { host = host, port = tonumber(port) }
  end
  return t
end

local function fleet_of(args)
  local id = concat({ args.rport or "", args.rpath or "", args.prefix or "", args.lease or "",
                      args.password or "", args.timeout or "", args.db or "", args.secret or "",
                      args.group or "", args.pool_size or "", args.username or "",
                      args.ssl or "", args.server_name or "", args.sentinels or "",
                      args.master_name or "", args.sentinel_password or "",
                      args.cluster or "" }, "|")
  local f = fleets[id]
  if not f then
    f = redis_tier.new({
      port = tonumber(args.rport), path = args.rpath, prefix = args.prefix,
      lease = tonumber(args.lease), password = args.password, timeout = tonumber(args.timeout),
      db = tonumber(args.db), secret = args.secret, pool_size = tonumber(args.pool_size),
      username = args.username, ssl = args.ssl and args.ssl == "1", server_name = args.server_name,
      sentinels = nodes(args.sentinels), master_name = args.master_name,
      sentinel_password = args.sentinel_password, cluster = nodes(args.cluster),
    }, { shm = "fleet_spec", group = args.group })
    fleets[id] = f
    prefixes[f] = args.prefix or "singleflight:"
  end
  return f, prefixes[f]
end

-- This worker's counters, by prefix, kept in the shared dict for /stats.
local function publish_stats(f, prefix)
  local dict, pid = ngx.shared.fleet_spec, ngx.worker.pid()
  for k, v in pairs(f:stats()) do
    dict:set("st|" .. prefix .. "|" .. pid .. "|" .. k, v)
  end
end

-- Every fleet's counters, published every 10 ms (the gauge `waiting`
-- changes while a call waits).
local function publish_all(premature)
  if premature then
    return
  end
  for f, prefix in pairs(prefixes) do
    publish_stats(f, prefix)
  end
end

local handlers = {}

function handlers.run(args)
  local f, prefix = fleet_of(args)
  local key, pause = args.key, tonumber(args.sleep) or 0.2
  local function produce()
    local cf = assert(io.open(count_file, "a"))
    cf:write(key, " ", name, " ", ngx.worker.pid(), "\n")
    cf:close()
    ngx.sleep(pause)
    if args.mode == "panic" then
      return assert(core.encode(false, { code = 42, by = name }, "the leader's traceback"))
    end
    return assert(core.encode(true, {
      value = args.value or "v", by = name, at = precise_now(), list = { 1, 2, { 3 } },
    }, "second"))
  end
  local t0 = now()
  local bytes, how, shared = f:outcome(key, produce)
  local t1, t1p = now(), precise_now()
  publish_stats(f, prefix)
  local ok, a, b = core.decode(bytes)
  local out = {
    how = how, ok = ok, instance = name, pid = ngx.worker.pid(), took_ms = (t1 - t0) * 1000,
    shared = shared,
  }
  if ok then
    out.value, out.by, out.err = a.value, a.by, b
    out.list = a.list and (a.list[1] .. "," .. a.list[2] .. "," .. a.list[3][1])
    out.gap_ms = (t1p - a.at) * 1000
  else
    out.code, out.by, out.traceback = a.code, a.by, b
  end
  reply(out)
end

-- /group?key=&rport=...: a g:call of a group with shm and redis, the whole
-- stack (callers wait in their worker, one per worker on the shm tier, one
-- per instance on Redis); fn appends to the count file as /run's produce
-- does and returns ?value. The group: singleflight.group(?group, o) if
-- ?group is given, else singleflight.new(o), with ?wait as its timeout,
-- ?on_timeout, and the Redis settings ?rport, ?prefix, ?lease (default 1),
-- ?secret, ?pool_size, ?sentinels with ?gmaster (master_name) and
-- ?gsentinel_password, ?cluster.
local singleflight = require "singleflight"
local groups = {}

local function group_of(args)
  local id = concat({ args.rport or "", args.prefix or "", args.group or "", args.wait or "",
                      args.on_timeout or "", args.lease or "", args.secret or "",
                      args.pool_size or "", args.sentinels or "", args.gmaster or "",
                      args.gsentinel_password or "", args.cluster or "" }, "|")
  local g = groups[id]
  if not g then
    local o = {
      shm = "fleet_group", timeout = tonumber(args.wait), on_timeout = args.on_timeout,
      redis = { port = tonumber(args.rport), prefix = args.prefix,
                lease = tonumber(args.lease) or 1, secret = args.secret,
                pool_size = tonumber(args.pool_size), sentinels = nodes(args.sentinels),
                master_name = args.gmaster, sentinel_password = args.gsentinel_password,
                cluster = nodes(args.cluster) },
    }
    if args.group then
      g = singleflight.group(args.group, o)
    else
      g = singleflight.new(o)
    end
    groups[id] = g
  end
  return g
end

function handlers.group(args)
  local g = group_of(args)
  local key, pause = args.key, tonumber(args.sleep) or 0.2
  local t0 = now()
  local ok, v, err, shared = pcall(g.call, g, key, function()
    local cf = assert(io.open(count_file, "a"))
    cf:write(key, " ", name, " ", ngx.worker.pid(), "\n")
    cf:close()
    ngx.sleep(pause)
    if args.mode == "panic" then
      error({ code = 42, by = name })
    end
    return { value = args.value or "v", by = name, list = { 1, 2, { 3 } } }, "second"
  end)
  local st = g:stats()
  local out = { instance = name, ok = ok, fleet_leads = st.fleet_leads,
                fleet_waits = st.fleet_waits, timeouts = st.timeouts,
                took_ms = (now() - t0) * 1000 }
  if ok and v == nil then
    out.err, out.shared = err, shared
  elseif ok then
    out.value, out.by, out.err, out.shared = v.value, v.by, err, shared
    out.list = v.list[1] .. "," .. v.list[2] .. "," .. v.list[3][1]
  else
    out.panic = singleflight.is_panic(v)
    out.code, out.by = type(v.value) == "table" and v.value.code, type(v.value) == "table"
                       and v.value.by
  end
  reply(out)
end

-- /gforget?key=&...: g:forget(key) on /group's group of the same query.
function handlers.gforget(args)
  reply { forgot = group_of(args):forget(args.key) }
end

function handlers.forget(args)
  local f, prefix = fleet_of(args)
  local was, err = f:forget(args.key)
  publish_stats(f, prefix)
  reply { forgot = was, err = err }
end

--- The counters of ?prefix, summed over the workers that used it.
function handlers.stats(args)
  local dict, want = ngx.shared.fleet_spec, "st|" .. (args.prefix or "singleflight:") .. "|"
  local sum = {}
  for _, k in ipairs(dict:get_keys(0)) do
    if k:sub(1, #want) == want then
      local field = k:match("|([%w_]+)$")
      sum[field] = (sum[field] or 0) + dict:get(k)
    end
  end
  reply(sum)
end

function app.content()
  local h = handlers[ngx.var.uri:match("^/([%w_]+)$") or ""]
  if not h then
    ngx.status = 404
    return reply { error = "no handler" }
  end
  h(ngx.req.get_uri_args())
end

function app.init(instance_name, file)
  name, count_file = instance_name, file
end

--- A safety net: the instance ends itself after `secs`, should the spec
-- run die before it stops nginx (a worker's own exit would be respawned).
function app.init_worker(secs)
  ngx.timer.every(0.01, publish_all)
  local master = require("ngx.process").get_master_pid()
  ngx.timer.at(secs, function()
    os.execute("kill -TERM " .. tonumber(master))
  end)
end

return app
