-- The application the OpenResty specs talk to over HTTP (nginx_server.lua
-- starts nginx with it; the 40- and 41-openresty specs drive it). One
-- worker, so module-level state is shared by every request (but for the
-- handlers named cc_*, which serve a server with lua_code_cache off: a Lua
-- state per request, meeting in singleflight.group("cc") and a shared
-- dict). Each handler answers with lines of key=value.
-- Counts the garbage collections asked for by the library's own files
-- (it must ask for none): set before the library is loaded, so that a
-- module that keeps collectgarbage in a local keeps this one.
local library_collections = 0
do
  local collect = collectgarbage
  _G.collectgarbage = function(opt, ...)
    local src = debug.getinfo(2, "S").source
    if (opt == nil or opt == "collect" or opt == "step")
       and src:find("/singleflight/", 1, true) then
      library_collections = library_collections + 1
    end
    return collect(opt, ...)
  end
end

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
  -- leaders whose request ends inside fn; no timeout anywhere
  gone = singleflight.new(),
  -- the nginx edges: ssl phases, g:start in every phase
  edge = singleflight.new(),
  -- fn that raises, in callers that catch the panic and callers that don't
  -- (and raise_shm, over the lua_shared_dict "raise_sf", made at first use)
  raise = singleflight.new(),
  raise_stampede = singleflight.new(),
  raise_outer = singleflight.new(),
  raise_inner = singleflight.new(),
  raise_unshared = singleflight.new { timeout = 0.05, on_timeout = "run" },
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

---------------------------------------------------------------------------
-- Leaders that go away: the request of the leader of ?key= ends inside fn,
-- ?how=exit|exec|redirect|abort, or, under g:start, its light thread is
-- killed (?how=kill) or the request exits around it (?how=start_exit). The
-- leader holds on until ?n= duplicates (gone_dup) joined. ended_at says
-- when its request ended, for the duplicates' reports.

local ended_at, gone_threads = {}, {}

local function joined(g, n)
  local base = g:stats().shared
  return function()
    return g:stats().shared >= base + n
  end
end

function handlers.gone_leader(args)
  local g, key, how = groups.gone, args.key, args.how
  local all_in = joined(g, tonumber(args.n))
  if how == "kill" or how == "start_exit" then
    local f = g:start(key, function()
      gone_threads[key] = coroutine.running()
      ngx.sleep(30)
      return "first"
    end)
    sleep_until(all_in, 10)
    ended_at[key] = now()
    if how == "start_exit" then
      gone_threads[key] = nil -- nothing keeps the light thread but nginx
      return ngx.exit(204)
    end
    local ok, err = ngx.thread.kill(gone_threads[key])
    gone_threads[key] = nil -- nor the killed one: the collector sees it go
    return reply { killed = ok and true or false, err = err, ready = f:ready() }
  end
  local v = g:call(key, function()
    sleep_until(all_in, 10)
    if how ~= "abort" then
      ended_at[key] = now()
    end
    if how == "exit" then
      ngx.exit(503)
    elseif how == "exec" then
      ngx.exec("/gone_exec_target")
    elseif how == "redirect" then
      ngx.redirect("/gone_elsewhere", 302)
    end
    ngx.sleep(30) -- abort: until the client goes away
    return "first"
  end)
  reply { value = v }
end

--- The log phase of /gone_leader: an aborted request ends here.
function app.gone_finished()
  local key = ngx.var.arg_key
  if key and not ended_at[key] then
    ended_at[key] = now()
  end
end

function handlers.gone_exec_target()
  reply { exec_target = "reached" }
end

--- A duplicate of ?key=: it leads, should it take over.
function handlers.gone_dup(args)
  local g, key = groups.gone, args.key
  local led = false
  local v, err, shared = g:call(key, function()
    led = true
    ngx.sleep(0.02)
    return "second"
  end)
  reply {
    value = v, err = err, shared = shared, led = led,
    after_ms = ended_at[key] and (now() - ended_at[key]) * 1000 or -1,
  }
end

--- A duplicate that is a future.
function handlers.gone_future(args)
  local g, key = groups.gone, args.key
  local led = false
  local f = g:start(key, function()
    led = true
    ngx.sleep(0.02) -- the other futures join this one meanwhile
    return "second"
  end)
  local v, err, shared = f:wait()
  reply {
    value = v, err = err, shared = shared, led = led,
    after_ms = ended_at[key] and (now() - ended_at[key]) * 1000 or -1,
  }
end

--- A light thread leads ?key= and is killed with ngx.thread.kill; then, with
-- ?self=1, the request calls ?key= itself.
function handlers.kill_then_call(args)
  local g, key = groups.gone, args.key
  local before = g:stats()
  local co = ngx.thread.spawn(function()
    return g:call(key, function()
      ngx.sleep(30)
      return "thread"
    end)
  end)
  local leading = g:stats().executions == before.executions + 1
  local killed = ngx.thread.kill(co) and true or false
  if args.collect then -- the application drops the thread, and a cycle
    co = nil -- runs before anyone waits
    collectgarbage()
  end
  local out = { leading = leading, killed = killed }
  if args.self then
    out.value = g:call(key, function()
      out.led = true
      return "self"
    end)
  end
  local st = g:stats()
  out.inflight, out.abandoned = st.inflight, st.abandoned - before.abandoned
  -- the application keeps its handle on the thread to the end, as code
  -- that spawned it does
  out.thread = co and coroutine.status(co) or "dropped"
  reply(out)
end

---------------------------------------------------------------------------
-- lua_code_cache off (cc_*): every request is a Lua state of its own; they
-- meet in the process-wide group "cc", and in the shared dict sf_spec.

local function cc_group(args)
  return singleflight.group("cc", { timeout = tonumber(args.timeout) })
end

--- The leader of ?key=: holds on until cc_release, or, with ?how=exit,
-- ends its request with ngx.exit(503) once a duplicate joined.
function handlers.cc_lead(args)
  local g, key, dict = cc_group(args), args.key, ngx.shared.sf_spec
  local v = g:call(key, function()
    if args.how == "exit" then
      sleep_until(joined(g, 1), 10)
      dict:set("ended:" .. key, now())
      ngx.exit(503)
    end
    sleep_until(function() return dict:get("release:" .. key) end, 10)
    return { v = "from leader " .. key }
  end)
  reply { value = v.v }
end

function handlers.cc_release(args)
  ngx.shared.sf_spec:set("release:" .. args.key, true)
  reply { released = args.key }
end

function handlers.cc_dup(args)
  local g, key = cc_group(args), args.key
  local led, t0 = false, now()
  local v, err, shared = g:call(key, function()
    led = true
    return { v = "own" }
  end)
  local ended = ngx.shared.sf_spec:get("ended:" .. key)
  reply {
    value = v and v.v, err = err, shared = shared, led = led,
    waited_ms = (now() - t0) * 1000,
    after_ms = ended and (now() - ended) * 1000 or -1,
  }
end

function handlers.cc_stats()
  local st = singleflight.group("cc"):stats()
  st.pending_timers = ngx.timer.pending_count()
  st.running_timers = ngx.timer.running_count()
  reply(st)
end

---------------------------------------------------------------------------
-- TLS: /tls makes a handshake with the TLS server of this nginx
-- (?port=), through a cosocket; the phase ?phase= (hello, cert, fetch)
-- then does ?act=: dup (a duplicate of "tls", held by tls_hold), lead (the
-- leader of a fresh key) or start (g:start). fetch needs a resumed session:
-- a first handshake makes one.

local tls = { plan = nil, log = {} }

function handlers.tls_hold()
  local g = groups.edge
  tls.released = false
  local v = g:call("tls", function()
    sleep_until(function() return tls.released end, 10)
    return "held"
  end)
  reply { value = v }
end

function handlers.tls_release()
  tls.released = true
  reply { released = true }
end

local function handshake(port, session)
  local sock = ngx.socket.tcp()
  sock:settimeout(5000)
  local ok, err = sock:connect("127.0.0.1", tonumber(port))
  if not ok then
    return nil, "connect: " .. tostring(err)
  end
  local sess, herr = sock:sslhandshake(session, "localhost", false)
  sock:close()
  return sess, herr
end

function handlers.tls(args)
  tls.log = {}
  local session
  if args.phase == "fetch" then
    session = handshake(args.port)
  end
  tls.plan = { phase = args.phase, act = args.act }
  local sess, err = handshake(args.port, session)
  tls.plan = nil
  local out = { handshake = sess ~= nil, err = err }
  for k, v in pairs(tls.log) do
    out[k] = v
  end
  reply(out)
end

function app.tls_phase(phase)
  local plan = tls.plan
  tls.log["ran_" .. phase] = true
  if not plan or plan.phase ~= phase then
    return
  end
  local g = groups.edge
  if plan.act == "dup" then
    local ok, v = pcall(g.call, g, "tls", function() return "dup led" end)
    tls.log.ok, tls.log.result = ok, tostring(v)
  elseif plan.act == "lead" then
    local key = "tls-lead-" .. phase .. "-" .. now()
    local ok, v = pcall(g.call, g, key, function() return "led in " .. ngx.get_phase() end)
    tls.log.ok, tls.log.result = ok, tostring(v)
  elseif plan.act == "start" then
    local ok, f = pcall(g.start, g, "tls-start-" .. phase, function()
      ngx.sleep(0.01) -- a yield: in a light thread here, the handshake would end
      return "ran in " .. ngx.get_phase()
    end)
    tls.log.ok, tls.log.result = ok, tostring(f)
    tls.future = ok and f or nil
  end
end

function handlers.tls_future()
  local f = tls.future
  if not f then
    return reply { missing = true }
  end
  local v, err = f:wait(5)
  reply { value = v, err = err }
end

---------------------------------------------------------------------------
-- g:start in every phase: try_start(phase) keeps what happened; /starts
-- tells, after waiting for the futures that started. In exit_worker the
-- outcome goes to the error log.

local starts = {}

function app.try_start(phase)
  local g = groups.edge
  local ok, f = pcall(g.start, g, "start-in-" .. phase, function()
    return "ran in " .. ngx.get_phase()
  end)
  starts[phase] = { ok = ok, f = ok and f or nil, err = not ok and tostring(f) or nil }
  if phase == "exit_worker" then
    ngx.log(ngx.WARN, "start in exit_worker: ", ok and "started" or tostring(f))
  end
end

function handlers.starts()
  local out = {}
  for phase, r in pairs(starts) do
    out[phase .. "_ok"] = r.ok
    if r.ok then
      local v, err = r.f:wait(5)
      out[phase .. "_value"] = v or err
    else
      out[phase .. "_err"] = r.err
    end
  end
  reply(out)
end

--- A leader in this worker's Lua state, and ?n= duplicates in Lua states
-- of nginx's thread pool (ngx.run_worker_thread): they block their OS
-- threads in the core and share the leader's result.
function handlers.worker_threads(args)
  local g, key, n = singleflight.group("worker_thread"), args.key, tonumber(args.n)
  local leader = ngx.thread.spawn(function()
    return g:call(key, function()
      ngx.sleep(0.5)
      return "leader"
    end)
  end)
  local dups = {}
  for i = 1, n do
    dups[i] = ngx.thread.spawn(function()
      return ngx.run_worker_thread("singleflight_spec", "ngx_worker_thread", "dup", key)
    end)
  end
  local out = {}
  local _, v, _, shared = ngx.thread.wait(leader)
  out.leader = v .. "/" .. tostring(shared)
  for i = 1, n do
    local _, ok, dv, err, dshared = ngx.thread.wait(dups[i])
    if not ok then
      out["dup" .. i] = "error: " .. tostring(dv)
    elseif dv == nil then
      out["dup" .. i] = "nil: " .. tostring(err)
    else
      out["dup" .. i] = tostring(dv) .. "/" .. tostring(dshared)
    end
  end
  reply(out)
end

--- How many collections the library asked for.
function handlers.library_collections()
  reply({ n = library_collections })
end

-- What users' fn do: a query that fails deep down.
local function query_db(msg)
  error(msg)
end

--- fn raises, the panic is not caught: ngx_lua ends the request (500).
function handlers.raise_unhandled(args)
  groups.raise:call(args.key, function()
    query_db(args.msg)
  end)
end

--- fn raises, the panic is caught: its fields, as the application sees them.
function handlers.raise_caught(args)
  local ok, e = pcall(groups.raise.call, groups.raise, args.key, function()
    query_db(args.msg)
  end)
  local p = type(e) == "table" and e or {}
  reply {
    ok = ok, is_panic = singleflight.is_panic(e), value = p.value, key = p.key,
    traceback_has_query = type(p.traceback) == "string"
                          and p.traceback:find("query_db", 1, true) ~= nil,
    text = tostring(e),
  }
end

--- n requests on one key, none catching: fn raises once the other n-1
-- joined it.
function handlers.raise_stampede(args)
  local g, n = groups.raise_stampede, tonumber(args.n)
  local base = g:stats().shared
  g:call(args.key, function()
    sleep_until(function() return g:stats().shared >= base + n - 1 end, 10)
    query_db(args.msg)
  end)
end

--- fn calls another group's call ("<key>-inner"), whose fn raises: the
-- outer call's panic is the inner one's, raised again through the outer fn.
function handlers.raise_nested(args)
  groups.raise_outer:call(args.key, function()
    return groups.raise_inner:call(args.key .. "-inner", function()
      query_db(args.msg)
    end)
  end)
end

--- fn raises in a group over a lua_shared_dict.
function handlers.raise_shm(args)
  groups.raise_shm = groups.raise_shm or singleflight.new { shm = "raise_sf" }
  groups.raise_shm:call(args.key, function()
    query_db(args.msg)
  end)
end

--- A leader of raise_unshared that takes its time, and succeeds.
function handlers.raise_slow(args)
  reply { value = groups.raise_unshared:call(args.key, function()
    ngx.sleep(1)
    return "slow"
  end) }
end

--- A duplicate of raise_unshared that gives up waiting and runs its own
-- fn, which raises.
function handlers.raise_unshared(args)
  groups.raise_unshared:call(args.key, function()
    query_db(args.msg)
  end)
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
