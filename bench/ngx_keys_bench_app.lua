--- The nginx side of bench/nginx_keys_bench.lua: many keys in flight at
-- once in every worker, through one group over a lua_shared_dict, with the
-- load made in nginx itself (no socket per caller). /go (any worker) sets
-- a load in the dict bench_book; each worker's watch timer sees it, and at
-- the same instant every worker spawns its callers as light threads of a
-- timer, `callers` per key, and measures its event loop's lag meanwhile: a
-- timer of 10 ms set again each time it fires, and how late it fires.
-- When its callers are answered, a worker writes its tally in the book.
local singleflight = require "singleflight"
local route = require "ngx_route"

local ngx = rawget(_G, "ngx")
local clock = singleflight._core.now
local fmt = string.format

local group = singleflight.new { shm = "bench_sf" }
local book = ngx.shared.bench_book

local BEAT = 0.01 -- the lag sampler's timer
local BATCH = 100 -- callers spawned between two yields to the event loop

local app = {}

-- The lag sampler: st.worst is the latest it fired, in seconds.
local function sample(premature, st)
  if premature then
    return
  end
  local now = clock()
  if now - st.due > st.worst then
    st.worst = now - st.due
  end
  if st.running then
    st.due = clock() + BEAT
    ngx.timer.at(BEAT, sample, st)
  end
end

local function load(premature, p)
  if premature then
    return
  end
  local st = { worst = 0, running = true, due = clock() + BEAT }
  ngx.timer.at(BEAT, sample, st)
  ngx.sleep(math.max(0, p.at - clock()))
  local answered, errors = 0, 0
  local function fn()
    book:incr("execs:" .. p.gen, 1, 0)
    ngx.sleep(p.secs)
    return "v"
  end
  local function caller(key)
    local ok, v = pcall(group.call, group, key, fn)
    if ok and v == "v" then
      answered = answered + 1
    else
      errors = errors + 1
    end
  end
  local threads, t0 = {}, clock()
  for k = 1, p.keys do
    local key = fmt("g%sk%d", p.gen, k)
    for _ = 1, p.callers do
      threads[#threads + 1] = ngx.thread.spawn(caller, key)
      if #threads % BATCH == 0 then
        ngx.sleep(0.001) -- (a sleep of 0 resumes before any timer due)
      end
    end
  end
  local spawn = clock() - t0
  for _, t in ipairs(threads) do
    ngx.thread.wait(t)
  end
  local took = clock() - t0
  st.running = false
  book:set(fmt("done:%s:%d", p.gen, ngx.worker.pid()),
           fmt("answered=%d errors=%d lag=%.6f spawn=%.6f took=%.6f",
               answered, errors, st.worst, spawn, took))
end

local seen

local function watch(premature)
  if premature then
    return
  end
  local go = book:get("go")
  if go and go ~= seen then
    seen = go
    local p = {}
    for k, v in go:gmatch("(%w+)=(%S+)") do
      p[k] = tonumber(v)
    end
    ngx.timer.at(0, load, p)
  end
end

function app.init_worker()
  seen = book:get("go") -- a worker started again joins no earlier load
  ngx.timer.every(0.05, watch)
end

local handlers = {}

--- Sets a load: ?keys=, ?callers= per key in each worker, ?secs= per fn;
-- it starts in every worker 0.3 s from now. Answers its number (gen).
function handlers.go(args)
  local gen = book:incr("gen", 1, 0)
  book:set("go", fmt("gen=%d keys=%d callers=%d secs=%s at=%.6f", gen,
                     tonumber(args.keys), tonumber(args.callers), tonumber(args.secs),
                     clock() + 0.3))
  ngx.say("gen=", gen)
end

--- The executions of load ?gen= so far, and each worker's tally once it
-- is done ("done_<pid>=answered=... errors=... lag=... spawn=... took=...").
function handlers.status(args)
  local out = { "execs=" .. tostring(book:get("execs:" .. args.gen) or 0) }
  local prefix = "done:" .. args.gen .. ":"
  for _, k in ipairs(book:get_keys(0)) do
    if k:sub(1, #prefix) == prefix then
      out[#out + 1] = "done_" .. k:sub(#prefix + 1) .. "=" .. book:get(k)
    end
  end
  ngx.say(table.concat(out, "\n"))
end

app.content = route(handlers)

return app
