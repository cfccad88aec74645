-- The application the shm specs talk to over HTTP: nginx with several
-- workers (nginx_server.lua, opts.workers), groups over lua_shared_dicts,
-- and a dict of its own ("book") where the specs' bookkeeping meets across
-- workers: arrivals, executions, the leader's pid, flags. Each handler
-- answers with lines of key=value; every answer says which worker gave it.
local singleflight = require "singleflight"

local ngx = ngx
local concat, tostring = table.concat, tostring

local app = {}

local book = ngx.shared.book
-- a precise clock that every worker shares (CLOCK_MONOTONIC)
local clock = singleflight._core.now

-- A codec of the application's own, for values { name = <string>, n =
-- <number> } and a string err: counts its calls in the book. With
-- how = "raise" its encode raises, "garbage" its encode returns a number,
-- "bad_decode" its decode raises.
local function counted_codec(name, how)
  return {
    encode = function(v, err)
      book:incr("encoded:" .. name, 1, 0)
      if how == "raise" then
        error("no encoding today")
      elseif how == "garbage" then
        return 42
      end
      return v.name .. "\n" .. string.format("%.17g", v.n) .. "\n" .. tostring(err)
    end,
    decode = function(bytes)
      book:incr("decoded:" .. name, 1, 0)
      if how == "bad_decode" then
        error({ reason = "a table, raised" })
      end
      local vname, n, err = bytes:match("^(.-)\n(.-)\n(.*)$")
      return { name = vname, n = tonumber(n), by_codec = true }, err
    end,
  }
end

local groups = {
  stampede = singleflight.new { shm = "sf" },
  panic = singleflight.new { shm = "sf" },
  cross = singleflight.new { shm = "sf" },
  kill = singleflight.new { shm = "sf" },
  gone = singleflight.new { shm = "sf" },
  slow = singleflight.new { shm = "sf" },
  aged = singleflight.new { shm = "sf", max_age = 0.3 },
  forget = singleflight.new { shm = "sf" },
  tiny = singleflight.new { shm = "tiny" },
  short = singleflight.new { shm = "sf", timeout = 0.2 },
  short_run = singleflight.new { shm = "sf", timeout = 0.2, on_timeout = "run" },
  zero = singleflight.new { shm = "sf", timeout = 0 },
  zero_run = singleflight.new { shm = "sf", timeout = 0, on_timeout = "run" },
  start = singleflight.new { shm = "sf" },
  named = singleflight.group("named", { shm = "sf" }),
  -- codecs (each a named group: counters of their own)
  counted = singleflight.group("counted", { shm = "sf", codec = counted_codec("counted") }),
  raise = singleflight.group("raise", { shm = "sf", codec = counted_codec("raise", "raise") }),
  garbage = singleflight.group("garbage",
                               { shm = "sf", codec = counted_codec("garbage", "garbage") }),
  bad_decode = singleflight.group("bad_decode",
                                  { shm = "sf", codec = counted_codec("bad_decode",
                                                                      "bad_decode") }),
  copy = singleflight.group("copy", { shm = "sf", codec = "copy" }),
  buffer = singleflight.group("buffer", { shm = "sf", codec = "buffer" }),
  default = singleflight.group("default", { shm = "sf" }),
  -- the same stampede, with one group per worker: the comparison
  local_only = singleflight.new(),
}

local function now()
  ngx.update_time()
  return ngx.now()
end

local function reply(t)
  t.pid = ngx.worker.pid()
  local out = {}
  for k, v in pairs(t) do
    out[#out + 1] = k .. "=" .. tostring(v)
  end
  table.sort(out)
  ngx.say(concat(out, "\n"))
end

-- Sleeps until pred() or `secs` pass (the specs' barrier).
local function sleep_until(pred, secs)
  local deadline = now() + secs
  while not pred() and now() < deadline do
    ngx.sleep(0.005)
  end
  return pred()
end

-- This worker's stats of group `name`, kept in the book under its worker
-- id, after each call: the last call of a worker leaves them whole.
local function publish_stats(name)
  local line = {}
  for k, v in pairs(groups[name]:stats()) do
    line[#line + 1] = k .. "=" .. tostring(v)
  end
  book:set("stats:" .. name .. ":" .. ngx.worker.id(), concat(line, ","))
end

local handlers = {}

-- The common fn of the stampedes: counts the execution, waits until `n`
-- requests arrived on the key (or 10 s), holds `hold` seconds more, and
-- returns a table that shows whose execution it was.
local function executor(name, key, n, hold)
  return function()
    local exec = book:incr("exec:" .. name .. key, 1, 0)
    book:set("leader:" .. name .. key, ngx.worker.pid())
    sleep_until(function()
      return (book:get("arrived:" .. name .. key) or 0) >= n
    end, 10)
    if hold > 0 then
      ngx.sleep(hold)
    end
    local list = { 1, 2.5, "three" }
    local v = { exec = exec, pid = ngx.worker.pid(), list = list, again = list,
                at = now() }
    v.me = v
    book:set("ended:" .. name .. key, clock())
    return v, "second"
  end
end

local function arrive(name, key)
  book:incr("arrived:" .. name .. key, 1, 0)
end

--- n requests on one key, in a group over the dict (or, with
-- group=local_only, one group per worker)
function handlers.stampede(args)
  local name = args.group or "stampede"
  local g, key, n = groups[name], args.key or "k", tonumber(args.n) or 1
  local fn = executor(name, key, n, tonumber(args.hold) or 0.05)
  arrive(name, key)
  local v, err, shared = g:call(key, fn)
  local done = clock()
  publish_stats(name)
  reply {
    exec = v.exec, leader = v.pid, err = err, shared = shared,
    cycle = v.me == v, shared_list = v.list == v.again,
    list = concat({ tostring(v.list[1]), tostring(v.list[2]), v.list[3] }, ","),
    gap_ms = string.format("%.3f", (done - book:get("ended:" .. name .. key)) * 1000),
  }
end

--- n requests on one key whose fn raises a table (or, with kind=fn, a
-- function, which crosses as its text)
function handlers.panic(args)
  local key, n = args.key or "p", tonumber(args.n) or 1
  arrive("panic", key)
  local raised = args.kind == "fn" and print or { code = 42, nested = { deep = true } }
  local function explode()
    book:incr("exec:panic" .. key, 1, 0)
    book:set("leader:panic" .. key, ngx.worker.pid())
    sleep_until(function() return (book:get("arrived:panic" .. key) or 0) >= n end, 10)
    ngx.sleep(0.05)
    error(raised)
  end
  local ok, e = pcall(groups.panic.call, groups.panic, key, explode)
  publish_stats("panic")
  local value = e and e.value
  reply {
    ok = ok, is_panic = singleflight.is_panic(e), key = e and e.key,
    value_type = type(value),
    code = type(value) == "table" and value.code,
    deep = type(value) == "table" and type(value.nested) == "table" and value.nested.deep,
    same = value == raised,
    value_id = tostring(value),
    text = type(value) == "string" and value:match("^function") and "function" or "",
    -- the leader's traceback: its first frame below error is explode's
    raised_in_app = e and type(e.traceback) == "string"
      and (e.traceback:match("^[^\n]*\n[^\n]*\n%s*([^\n]*)") or ""):find("ngx_shm_app.lua", 1, true)
      ~= nil,
    wrapped = singleflight.is_panic(value),
    message = tostring(e):sub(1, 14),
  }
end

--- n requests on one key whose fn returns a value that cannot cross
function handlers.cross(args)
  local key, n = args.key or "c", tonumber(args.n) or 1
  arrive("cross", key)
  local ok, v, err = pcall(groups.cross.call, groups.cross, key, function()
    book:incr("exec:cross" .. key, 1, 0)
    book:set("leader:cross" .. key, ngx.worker.pid())
    sleep_until(function() return (book:get("arrived:cross" .. key) or 0) >= n end, 10)
    ngx.sleep(0.05)
    return print, "fine"
  end)
  publish_stats("cross")
  reply { ok = ok, type = ok and type(v) or "", err = ok and err or "",
          message = not ok and tostring(v) or "", is_panic = singleflight.is_panic(v) }
end

--- The leader of the first execution holds on for 30 s (or until
-- "release:kill" is set); later executions return at once. The spec kills
-- the first leader's worker.
function handlers.kill(args)
  local key = args.key or "kill"
  arrive("kill", key)
  local v, err = groups.kill:call(key, function()
    local exec = book:incr("exec:kill" .. key, 1, 0)
    book:set("leader:kill" .. key .. ":" .. exec, ngx.worker.pid())
    book:set("started:kill" .. key .. ":" .. exec, now())
    if exec == 1 then
      sleep_until(function() return book:get("release:kill") end, 30)
    else
      ngx.sleep(0.05)
    end
    return "exec " .. exec .. " by " .. ngx.worker.pid()
  end)
  publish_stats("kill")
  reply { value = v, err = err }
end

--- The first execution holds on for 30 s (or until "release:gone" is
-- set): the spec closes its request's connection (nginx ends the request,
-- lua_check_client_abort on); later executions return at once.
function handlers.gone(args)
  local key = args.key or "gone"
  arrive("gone", key)
  local v = groups.gone:call(key, function()
    local exec = book:incr("exec:gone" .. key, 1, 0)
    book:set("leader:gone" .. key .. ":" .. exec, ngx.worker.pid())
    book:set("started:gone" .. key .. ":" .. exec, now())
    if exec == 1 then
      sleep_until(function() return book:get("release:gone") end, 30)
    else
      ngx.sleep(0.05)
    end
    return "exec " .. exec .. " by " .. ngx.worker.pid()
  end)
  publish_stats("gone")
  reply { value = v }
end

--- A slow leader (hold seconds) that is alive all along
function handlers.slow(args)
  local key, n = args.key or "s", tonumber(args.n) or 1
  local fn = executor("slow", key, n, tonumber(args.hold) or 2)
  arrive("slow", key)
  local v = groups.slow:call(key, fn)
  publish_stats("slow")
  reply { exec = v.exec, leader = v.pid }
end

--- max_age = 0.3: the first execution runs for `hold` seconds, later ones
-- return at once
-- (with ?all=1, every execution holds `hold` seconds: longer than max_age)
function handlers.aged(args)
  local key = args.key or "a"
  arrive("aged", key)
  local t0, led = now(), false
  local v, err, shared = groups.aged:call(key, function()
    led = true
    local exec = book:incr("exec:aged" .. key, 1, 0)
    book:set("started:aged" .. key .. ":" .. exec, now())
    ngx.sleep((exec == 1 or args.all) and (tonumber(args.hold) or 1.5) or 0.05)
    return "exec " .. exec
  end)
  publish_stats("aged")
  reply { value = v, err = err, shared = shared, at = now(), took = now() - t0, led = led }
end

--- The first execution holds until "release:forget" is set; later ones
-- return at once. /forget?key= forgets the key (in whichever worker).
function handlers.forget(args)
  local key = args.key or "f"
  arrive("forget", key)
  local v = groups.forget:call(key, function()
    local exec = book:incr("exec:forget" .. key, 1, 0)
    if exec == 1 then
      sleep_until(function() return book:get("release:forget") end, 20)
    else -- until the second wave is in
      sleep_until(function()
        return (book:get("arrived:forget" .. key) or 0) >= tonumber(args.n or 1)
      end, 10)
    end
    return "exec " .. exec
  end)
  publish_stats("forget")
  reply { value = v }
end

function handlers.do_forget(args)
  reply { forgot = groups.forget:forget(args.key or "f") }
end

--- Fills the tiny dict with entries that never expire, until nothing fits
function handlers.fill()
  local tiny = ngx.shared.tiny
  local n = 0
  for _, size in ipairs { 1000, 200, 50, 10, 1 } do
    local ok = true
    while ok do
      n = n + 1
      ok = tiny:safe_set("junk" .. n, string.rep("x", size))
    end
  end
  reply { entries = n, free = tiny.free_space and tiny:free_space() or "?" }
end

function handlers.tiny(args)
  local key, n = args.key or "t", tonumber(args.n) or 1
  local fn = executor("tiny", key, n, 0.05)
  arrive("tiny", key)
  local ok, v, err = pcall(groups.tiny.call, groups.tiny, key, fn)
  publish_stats("tiny")
  reply { ok = ok, exec = ok and v.exec or tostring(v), err = err,
          leader = ok and v.pid or "" }
end

--- timeout = 0.2 (with run=1: on_timeout = "run"; with zero=1, timeout =
-- 0); the first execution holds 1 s
function handlers.short(args)
  local key = args.key or "t"
  local name = (args.zero and "zero" or "short") .. (args.run and "_run" or "")
  arrive(name, key)
  local t0 = now()
  local v, err, shared = groups[name]:call(key, function()
    local exec = book:incr("exec:" .. name .. key, 1, 0)
    ngx.sleep(exec == 1 and 1 or 0.01)
    return "exec " .. exec .. " by " .. ngx.worker.pid()
  end)
  publish_stats(name)
  reply { value = v, err = err, shared = shared,
          waited_ms = string.format("%.0f", (now() - t0) * 1000) }
end

--- g:start and f:wait
function handlers.start(args)
  local key, n = args.key or "st", tonumber(args.n) or 1
  local fn = executor("start", key, n, 0.05)
  arrive("start", key)
  local f = groups.start:start(key, fn)
  local v, err, shared = f:wait()
  publish_stats("start")
  reply { exec = v.exec, err = err, shared = shared, ready = f:ready(),
          tostring = tostring(f):match("^singleflight.Future") ~= nil }
end

--- a named group over the dict
function handlers.named(args)
  local key, n = args.key or "nm", tonumber(args.n) or 1
  local fn = executor("named", key, n, 0.05)
  arrive("named", key)
  local v, err, shared = groups.named:call(key, fn)
  publish_stats("named")
  reply { exec = v.exec, err = err, shared = shared }
end

--- The dict's entries whose name starts with `prefix` (none: all of
-- them), the groups' counters ("c...") apart: they are counted only when
-- `prefix` starts with "c"
function handlers.entries(args)
  local keys = ngx.shared[args.dict or "sf"]:get_keys(0)
  local prefix = args.prefix or ""
  local counters = prefix:sub(1, 1) == "c"
  local n = 0
  for _, k in ipairs(keys) do
    if k:sub(1, #prefix) == prefix and (counters or k:sub(1, 1) ~= "c") then
      n = n + 1
    end
  end
  reply { entries = n }
end

--- n requests on one key of a group with a codec (?group): fn returns
-- { name, n } and "second" (with kind=panic, raises a table; with
-- kind=shapes, returns the value of ?shape)
local shapes = {
  -- a tree: string.buffer carries it under the default codec
  tree = function()
    local t = { name = "tree", n = 2.5, list = { 1, 2, 3 }, deep = { a = { b = { c = "d" } } } }
    return t, function(v)
      return v.name == "tree" and v.n == 2.5 and v.list[3] == 3 and v.deep.a.b.c == "d"
    end
  end,
  -- a subtable met twice, no cycle: kept as one table
  shared = function()
    local sub = { 1, 2 }
    return { a = sub, b = sub, name = "shared" }, function(v)
      return v.a == v.b and v.a[2] == 2
    end
  end,
  -- a cycle
  cycle = function()
    local t = { name = "cycle" }
    t.me = t
    return t, function(v)
      return v.me == v
    end
  end,
  -- a table with a metatable: dropped in the other workers (the leader's
  -- worker gets the very value)
  meta = function()
    return setmetatable({ name = "meta" }, { __index = { hidden = true } }), function(v, here)
      return v.name == "meta" and (getmetatable(v) ~= nil) == here and (v.hidden == true) == here
    end
  end,
}

function handlers.codec(args)
  local name, key, n = args.group, args.key or "c", tonumber(args.n) or 1
  local g = groups[name]
  local shape = args.shape and shapes[args.shape]
  arrive(name, key)
  local check
  local ok, v, err = pcall(g.call, g, key, function()
    book:incr("exec:" .. name .. key, 1, 0)
    book:set("leader:" .. name .. key, ngx.worker.pid())
    sleep_until(function() return (book:get("arrived:" .. name .. key) or 0) >= n end, 10)
    ngx.sleep(0.05)
    if args.kind == "panic" then
      error({ code = 42 })
    end
    if shape then
      local value
      value, check = shape()
      return value, "second"
    end
    return { name = "v" .. key, n = 0.1 + 0.2 }, "second"
  end)
  if ok and shape and not check then
    local _
    _, check = shape()
  end
  reply {
    ok = ok, name = ok and type(v) == "table" and v.name or "",
    n = ok and type(v) == "table" and string.format("%.17g", v.n or 0) or "",
    by_codec = ok and type(v) == "table" and v.by_codec or false,
    err = ok and err or "", message = not ok and tostring(v) or "",
    is_panic = singleflight.is_panic(v), code = not ok and type(v.value) == "table"
                                                and v.value.code or "",
    whole = ok and check ~= nil
            and check(v, book:get("leader:" .. name .. key) == ngx.worker.pid()) or false,
  }
end

--- The group's stats, as g:stats() gives them in the worker that answers
function handlers.istats(args)
  reply(groups[args.group]:stats())
end

--- What a group over the dict is beside a group private to the worker,
-- once the tier is loaded: both singleflight.Group, the tiered one with the
-- tier's methods, the other with the ordinary ones (the tier replaced
-- none of them)
function handlers.kinds()
  local core = require "singleflight.core"
  local tiered, plain = groups.stampede, groups.local_only
  local mt_t, mt_p = getmetatable(tiered), getmetatable(plain)
  local fresh = singleflight.new()
  local ok_bad, bad = pcall(tiered.call, tiered, "k", "not a function")
  local ok_nan, nan = pcall(tiered.call, tiered, 0 / 0, function() end)
  local _, crossed = pcall(tiered.call, plain, "k", function() end)
  local shut = singleflight.new { shm = "sf" }
  shut:close()
  local _, closed = pcall(shut.call, shut, "k", function() end)
  local _, closed_stats = pcall(shut.stats, shut)
  local _, closed_forget = pcall(shut.forget, shut, "k")
  local _, plain_bad = pcall(plain.call, plain, "k", "not a function")
  local _, plain_nan = pcall(plain.call, plain, 0 / 0, function() end)
  reply {
    names = mt_t.__name .. "," .. mt_p.__name,
    tostring = tostring(tiered):match("^singleflight%.Group") ~= nil,
    same_call = tiered.call == plain.call,
    same_forget = tiered.forget == plain.forget,
    same_stats = tiered.stats == plain.stats,
    plain_forget_core = plain.forget == core.methods.forget
                        and fresh.forget == core.methods.forget,
    plain_call = fresh.call == plain.call,
    bad = not ok_bad and bad or "", nan = not ok_nan and nan or "",
    plain_bad = plain_bad, plain_nan = plain_nan, crossed = crossed,
    closed = closed, closed_stats = closed_stats, closed_forget = closed_forget,
  }
end

--- The errors of new with a bad shm option
function handlers.bad_options()
  local _, missing = pcall(singleflight.new, { shm = "nope" })
  local _, number = pcall(singleflight.new, { shm = 42 })
  reply { missing = missing, number = number }
end

--- A value of the book
function handlers.book(args)
  reply { value = book:get(args.key) }
end

function handlers.set(args)
  book:set(args.key, args.value or true)
  reply { set = true }
end

--- The sum over the workers of the stats of group `group`, and how many
-- workers reported
function handlers.stats(args)
  local name = args.group or "stampede"
  local sum, workers = {}, 0
  for _, k in ipairs(book:get_keys(0)) do
    if k:sub(1, #("stats:" .. name .. ":")) == "stats:" .. name .. ":" then
      workers = workers + 1
      for field, v in book:get(k):gmatch("([%w_]+)=([^,]+)") do
        sum[field] = (sum[field] or 0) + tonumber(v)
      end
    end
  end
  sum.workers = workers
  reply(sum)
end

--- log_by_lua: a call on a key in flight, where nothing can wait
function app.log_phase()
  local key = ngx.var.arg_key or "lp"
  local ok, e = pcall(groups.slow.call, groups.slow, key, function() return "ran" end)
  book:set("log_phase:" .. key, ok and ("returned " .. tostring(e)) or tostring(e))
end

app.content = require("ngx_route")(handlers, "^/shm/([%w_]+)$")

return app
