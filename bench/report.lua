--- Turns the raw lines of bench/run.sh into the table of the targets.
--
--   lua bench/report.lua RESULTS [--smoke]
--
-- RESULTS holds lines "<run> <source> <name> <value>" (a source is core,
-- go or lua-<version>) and "meta <key> <text>". Every ratio is computed
-- within one run, from numbers measured side by side; the table shows the
-- median over the runs. With --smoke, PASS/MISS are shown but only the
-- presence of every row is checked: the exit status says whether each
-- benchmark program ran and reported.

local fmt = string.format

local path, flag = arg[1], arg[2]
assert(path, "usage: report.lua RESULTS [--smoke]")
local smoke = flag == "--smoke"

local meta, data, nruns = {}, {}, 0
for line in io.lines(path) do
  local k, text = line:match("^meta (%S+) ?(.*)$")
  if k then
    meta[k] = text
  else
    local run, src, name, value = line:match("^(%d+) (%S+) (%S+) (%S+)$")
    if run then
      run = tonumber(run)
      nruns = math.max(nruns, run)
      local key = src .. "." .. name
      data[key] = data[key] or {}
      data[key][run] = tonumber(value)
    end
  end
end

local function median(t)
  local v = {}
  for _, x in pairs(t) do
    v[#v + 1] = x
  end
  if #v == 0 then
    return nil
  end
  table.sort(v)
  local n = #v
  if n % 2 == 1 then
    return v[(n + 1) / 2]
  end
  return (v[n / 2] + v[n / 2 + 1]) / 2
end

-- The median over the runs of f(run), skipping runs where f gives nil.
local function per_run(f)
  local v = {}
  for r = 1, nruns do
    local x = f(r)
    if x then
      v[#v + 1] = x
    end
  end
  return median(v)
end

local function get(key, run)
  local t = data[key]
  if not t then
    return nil
  end
  if run then
    return t[run]
  end
  return median(t)
end

-- The value of key in the run where score(value, run) is the largest.
local function worst_run(key, score)
  local worst, top
  for r = 1, nruns do
    local v = get(key, r)
    if v and (top == nil or score(v, r) > top) then
      worst, top = v, score(v, r)
    end
  end
  return worst
end

-- a / b within each run
local function ratio(a, b)
  return per_run(function(r)
    local x, y = get(a, r), get(b, r)
    if x and y and y ~= 0 then
      return x / y
    end
  end)
end

local function num(x, digits)
  if x == nil then
    return "n/a"
  end
  local a = math.abs(x)
  if a >= 1e9 then
    return fmt("%.2fG", x / 1e9)
  elseif a >= 1e6 then
    return fmt("%.2fM", x / 1e6)
  elseif a >= 1e4 then
    return fmt("%.0f", x)
  end
  return fmt("%." .. (digits or 1) .. "f", x)
end

local function times(x)
  return x and fmt("%.2fx", x) or "n/a"
end

local rows, missing = {}, {}

-- A target row. verdict(value) -> "PASS" or "MISS (...)"; value nil means
-- the row's benchmark did not report.
local function row(what, measured, target, value, verdict, optional)
  local result
  if value == nil then
    result = optional and "skipped" or "NO DATA"
    if not optional then
      missing[#missing + 1] = what
    end
  else
    result = verdict(value)
  end
  rows[#rows + 1] = { what, measured, target, result }
end

local function at_least(t)
  return function(v)
    if v >= t then
      return "PASS"
    end
    return fmt("MISS (%.2fx short)", t / v)
  end
end

local function at_most(t)
  return function(v)
    if v <= t then
      return "PASS"
    end
    return fmt("MISS (%.2fx over)", v / t)
  end
end

local function equals(t)
  return function(v)
    if v == t then
      return "PASS"
    end
    return fmt("MISS (got %s)", num(v, 0))
  end
end

local have_go = meta.go ~= nil and meta.go ~= "none"
local have_54, have_jit = meta["lua-5.4"] ~= nil, meta["lua-jit"] ~= nil
local have = { ["5.4"] = have_54, jit = have_jit }

-- Uncontended, at least as fast as plain Lua: with an fn that yields
-- once, on 5.4 and LuaJIT (a trivial fn lets LuaJIT compile plain Lua's
-- flow away, which measures no singleflight); on PUC Lua also with an fn
-- that returns at once, from the main thread and in a coroutine
do
  for _, v in ipairs { "5.4", "jit" } do
    local s, name = "lua-" .. v, v == "jit" and "LuaJIT" or "Lua " .. v
    local sp = ratio(s .. ".yield_plain_ns", s .. ".yield_call_ns")
    row(name .. " uncontended g:call, fn yields once: speed vs plain Lua",
        fmt("%s (%s vs %s ns)", times(sp), num(get(s .. ".yield_call_ns")),
            num(get(s .. ".yield_plain_ns"))),
        ">= 1x", sp, at_least(1), not have[v])
  end
  for _, where in ipairs { { "", "" }, { "_co", " in a coroutine" } } do
    local call = "lua-5.4.call" .. where[1] .. "_ns"
    local sp = ratio("lua-5.4.plain_ns", call)
    row("Lua 5.4 uncontended g:call" .. where[2] .. ", fn returns at once: speed vs plain Lua",
        fmt("%s (%s vs %s ns)", times(sp), num(get(call)), num(get("lua-5.4.plain_ns"))),
        ">= 1x", sp, at_least(1), not have_54)
  end
end

-- Contended: one key under 100 coroutines, and a stampede of 1000, no
-- slower than plain Lua
do
  for _, v in ipairs { "5.4", "jit" } do
    local s, name = "lua-" .. v, v == "jit" and "LuaJIT" or "Lua " .. v
    local c = ratio(s .. ".contended_call_ns", s .. ".contended_plain_ns")
    row(name .. " one key, 100 coroutines: time vs plain Lua",
        fmt("%s (%s vs %s ns per call)", times(c), num(get(s .. ".contended_call_ns")),
            num(get(s .. ".contended_plain_ns"))),
        "<= 1x", c, at_most(1), not have[v])
    local st = ratio(s .. ".stampede_ms", s .. ".stampede_plain_ms")
    row(name .. " stampede of 1000: time vs plain Lua",
        fmt("%s (%s vs %s ms)", times(st), num(get(s .. ".stampede_ms"), 2),
            num(get(s .. ".stampede_plain_ms"), 2)),
        "<= 1x", st, at_most(1), not have[v])
  end
end

-- Opening a named group with 10 or many others alive
do
  local r = ratio("lua-5.4.named_open_many_ns", "lua-5.4.named_open_10_ns")
  row(fmt("Lua 5.4: opening a named group, %s alive vs 10",
          num(get("lua-5.4.named_alive_many"), 0)),
      fmt("%s (%s vs %s ns)", times(r), num(get("lua-5.4.named_open_many_ns")),
          num(get("lua-5.4.named_open_10_ns"))),
      "<= 1.25x (the same)", r, at_most(1.25), not have_54)
end

-- 4, 5: the C core against Go
do
  local t = ratio("core.acquire_ns", "go.do_ns")
  row("C core acquire+finish: time vs Go Group.Do",
      fmt("%s (%s vs %s ns)", times(t), num(get("core.acquire_ns")),
          num(get("go.do_ns"))),
      "<= 0.5x", t, at_most(0.5), not have_go)
  local p = ratio("core.par_ops", "go.par_ops")
  row("C core, 2 threads on 1024 keys: throughput vs Go",
      fmt("%s (%s vs %s calls/s)", times(p), num(get("core.par_ops")),
          num(get("go.par_ops"))),
      ">= 1.5x", p, at_least(1.5), not have_go)
end

-- 6: stampede
do
  local versions = { "5.4", "jit", "5.1", "5.2", "5.3" }
  local parts, worst, any = {}, nil, false
  for _, v in ipairs(versions) do
    local e = get("lua-" .. v .. ".stampede_execs")
    if e then
      any = true
      parts[#parts + 1] = fmt("%s: %s", v, num(e, 0))
      if e ~= 1 and (worst == nil or e > worst) then
        worst = e
      end
    end
  end
  local n = get("lua-5.4.stampede_callers") or 1000
  row(fmt("%s coroutines on one key: executions", num(n, 0)),
      table.concat(parts, ", "), "1", any and (worst or 1) or nil, equals(1))
end

-- 7: waves
do
  local w, e = get("core.waves"), get("core.waves_execs")
  row(fmt("C core, 2 threads x %s waves: executions", num(w, 0)),
      fmt("%s executions for %s waves", num(e, 0), num(w, 0)),
      "= waves", e and w and e - w + 0 or nil,
      function(d)
        return d == 0 and "PASS" or fmt("MISS (%s off)", num(d, 0))
      end)
end

-- 8: memory over many calls
do
  local tolerance = 64 -- KB, against 10^7 bytes for one byte per call
  for _, v in ipairs { "5.4", "jit" } do
    local src = "lua-" .. v
    local n = get(src .. ".growth_calls")
    local lua, rss = get(src .. ".growth_lua_kb"), get(src .. ".growth_rss_kb")
    local worst = lua and rss and math.max(lua, rss) or nil
    row(fmt("%s, %s calls: memory growth", v == "jit" and "LuaJIT" or "Lua " .. v,
            num(n, 0)),
        fmt("Lua heap %s KB, RSS %s KB", num(lua), num(rss, 0)),
        fmt("none (< %d KB)", tolerance), worst, at_most(tolerance), not have[v])
  end
end

-- 9: bytes per in-flight call
do
  local keylen = get("lua-5.4.inflight_keylen") or 8
  local core = get("core.inflight_bytes")
  row("C core: heap bytes per in-flight call, less the key",
      fmt("%s (record %s, malloc and table included; %d-byte key)",
          num(core and core - keylen), num(get("core.footprint"), 0), keylen),
      "<= 128", core and core - keylen, at_most(128))
  for _, v in ipairs { "5.4", "jit" } do
    local src = "lua-" .. v
    local l = get(src .. ".inflight_lua_bytes")
    local pl = get(src .. ".inflight_plain_bytes")
    local total = core and l and core + l - keylen
    row(fmt("%s: core + Lua heap per in-flight call, less the key, vs plain Lua",
            v == "jit" and "LuaJIT" or "Lua " .. v),
        fmt("%s (Lua %s; plain Lua %s)", num(total), num(l), num(pl and pl - keylen)),
        "<= plain", total and pl and total / (pl - keylen),
        at_most(1), not have[v])
  end
end

-- Across nginx workers: 200 requests on one key over 4 workers, a group
-- over a lua_shared_dict against a group per worker
do
  local d = per_run(function(r)
    local s, w = get("nginx.xworker_shm_p99_ms", r), get("nginx.xworker_worker_p99_ms", r)
    return s and w and s - w
  end)
  row(fmt("%s requests on one key over %s nginx workers: waiters' p99 over the backend, "
          .. "shm vs a group per worker", num(get("nginx.xworker_requests") or 200, 0),
          num(get("nginx.xworker_workers") or 4, 0)),
      fmt("%s ms (shm %s ms, executions %s; a group per worker %s ms, executions %s)",
          d and fmt("%+.1f", d) or "n/a", num(get("nginx.xworker_shm_p99_ms"), 2),
          num(get("nginx.xworker_shm_execs"), 0), num(get("nginx.xworker_worker_p99_ms"), 2),
          num(get("nginx.xworker_worker_execs"), 0)),
      "<= +10 ms", d, function(v)
        if v <= 10 then
          return "PASS"
        end
        return fmt("MISS (%+.1f ms over)", v - 10)
      end, true) -- skipped where nginx with the Lua module can't run
end

-- A big heap: /ping's worst latency beside slow calls with waiters, through
-- singleflight and through a plain-Lua singleflight on ngx.semaphore
do
  local d = per_run(function(r)
    local s, p = get("nginx.heap_sf_worst_ms", r), get("nginx.heap_plain_worst_ms", r)
    return s and p and s - p
  end)
  row(fmt("big heap: /ping worst, singleflight vs plain Lua (%s MB of Lua heap, %s keys "
          .. "whose fn waits %g s, %s waiters each)", num(get("nginx.heap_mb"), 0),
          num(get("nginx.heap_keys") or 20, 0), get("nginx.heap_secs") or 3,
          num(get("nginx.heap_waiters") or 2, 0)),
      fmt("%s ms (singleflight worst %s ms, p99 %s ms; plain worst %s ms, p99 %s ms)",
          d and fmt("%+.1f", d) or "n/a", num(get("nginx.heap_sf_worst_ms"), 2),
          num(get("nginx.heap_sf_p99_ms"), 2), num(get("nginx.heap_plain_worst_ms"), 2),
          num(get("nginx.heap_plain_p99_ms"), 2)),
      "within plain's + 100 ms", d, function(v)
        if v <= 100 then
          return "PASS"
        end
        return fmt("MISS (%+.1f ms over)", v - 100)
      end, true)
end

-- Watching: the CPU of a worker whose caller waits on another worker's leader
do
  local w = get("nginx.watch_worst_pct")
  row(fmt("watching: CPU of the worst worker whose caller waits on another's leader, "
          .. "over %g s (%s nginx workers, shm)", get("nginx.watch_secs") or 10,
          num(get("nginx.watch_workers") or 4, 0)),
      fmt("%s %% of a core (the same workers idle %s %%; the leader's %s %%)",
          num(w, 2), num(get("nginx.watch_idle_pct"), 2),
          num(get("nginx.watch_leader_pct"), 2)),
      "<= 0.5 %", w, at_most(0.5), true)
end

-- Many keys over several workers: executions (the worst run) and lag
do
  local keys = get("nginx.keys_keys") or 1000
  local worst = worst_run("nginx.keys_execs", function(e, r)
    return math.abs(e - (get("nginx.keys_keys", r) or keys))
  end)
  row(fmt("%s keys x %s nginx workers, %s callers per key per worker, fn %g s (shm): "
          .. "executions", num(keys, 0), num(get("nginx.keys_workers") or 4, 0),
          num((get("nginx.keys_callers") or 40000) / keys
              / (get("nginx.keys_workers") or 4), 0),
          get("nginx.keys_secs") or 3),
      fmt("%s (the worst run); event-loop lag at worst %s ms; %s of %s callers answered, "
          .. "%s errors", num(worst, 0),
          num(worst_run("nginx.keys_lag_ms", function(l) return l end), 1),
          num(get("nginx.keys_answered"), 0), num(get("nginx.keys_callers"), 0),
          num(get("nginx.keys_errors"), 0)),
      fmt("%s (one per key)", num(keys, 0)), worst, equals(keys), true)
end

-- Codecs (the codec option of groups with shm): the default against the
-- core's copier, LuaJIT, one round trip of a small table
do
  local r = ratio("lua-jit.codec_small_buffer_ns", "lua-jit.codec_small_copy_ns")
  row("LuaJIT codec round trip, small table: the default (buffer) vs the copier",
      fmt("%s (%s vs %s ns; %s vs %s bytes)", times(r),
          num(get("lua-jit.codec_small_buffer_ns")), num(get("lua-jit.codec_small_copy_ns")),
          num(get("lua-jit.codec_small_buffer_bytes"), 0),
          num(get("lua-jit.codec_small_copy_bytes"), 0)),
      "<= 1x", r, at_most(1), not have_jit or not get("lua-jit.codec_small_copy_ns"))
end

-- The Redis tier: executions, connections and commands per stampede over 3
-- instances x 2 workers (the pool at ngx_lua's default size, 30)
do
  local inst, workers = get("nginx.redis_instances") or 3, get("nginx.redis_workers") or 2
  local function stampede(name)
    return fmt("%s executions; Redis connections at most %s (%s opened), %s commands",
               num(get("nginx.redis_" .. name .. "_execs"), 0),
               num(get("nginx.redis_" .. name .. "_conns_most"), 0),
               num(get("nginx.redis_" .. name .. "_conns_opened"), 0),
               num(get("nginx.redis_" .. name .. "_commands"), 0))
  end
  local one = worst_run("nginx.redis_one_execs", function(e) return math.abs(e - 1) end)
  row(fmt("Redis fleet, %s instances x %s nginx workers, one key x %s requests: executions",
          num(inst, 0), num(workers, 0), num(get("nginx.redis_one_requests") or 200, 0)),
      stampede("one"), "1", one, equals(1), true)
  local keys = get("nginx.redis_many_keys") or 500
  local many = worst_run("nginx.redis_many_execs", function(e, r)
    return math.abs(e - (get("nginx.redis_many_keys", r) or keys))
  end)
  row(fmt("Redis fleet, %s keys at once, each on %s instances x %s workers: executions",
          num(keys, 0), num(inst, 0), num(workers, 0)),
      stampede("many"), fmt("%s (one per key)", num(keys, 0)), many, equals(keys), true)
  local bound = inst * workers * (30 + 2)
  local most = worst_run("nginx.redis_many_conns_most", function(c) return c end)
  row(fmt("Redis fleet, %s keys at once: Redis connections (the worst run)", num(keys, 0)),
      fmt("%s at most, for %s requests", num(most, 0),
          num(get("nginx.redis_many_requests"), 0)),
      fmt("<= %d: per worker its pool (30) and 2, whatever the keys", bound), most,
      at_most(bound), true)
end

-- A loader's cache misses under wrk (Zipf ids, a per-worker lrucache, a
-- 20 ms origin): the workers' CPU per request and p99.9, shm against a
-- group per worker, in alternating rounds of one nginx (each ratio the
-- median over pairs of rounds side by side)
do
  local function zipf(name)
    return get("nginx.zipf_" .. name)
  end
  local head = fmt("a loader over %s nginx workers, %s connections, Zipf ids, lrucache "
                   .. "in front, 20 ms origin", num(zipf("workers") or 4, 0),
                   num(zipf("conns") or 200, 0))
  local cpu = zipf("cpu_ratio")
  row(head .. ": worker CPU per request, shm vs a group per worker",
      fmt("%s (%s vs %s us; %s vs %s requests/s; origin calls %s%% vs %s%% of requests, "
          .. "%s vs %s begun while one of the id ran; %s errors; %s dict entries left)",
          times(cpu), num(zipf("shm_cpu_us"), 1), num(zipf("worker_cpu_us"), 1),
          num(zipf("shm_rps"), 0), num(zipf("worker_rps"), 0), num(zipf("shm_origin_pct"), 2),
          num(zipf("worker_origin_pct"), 2), num(zipf("shm_overlaps"), 0),
          num(zipf("worker_overlaps"), 0),
          num((zipf("shm_errors") or 0) + (zipf("worker_errors") or 0), 0),
          num(zipf("inflight_left"), 0)),
      "<= 1.10x", cpu, at_most(1.10), true)
  local tail = zipf("p999_ratio")
  row(head .. ": p99.9 latency, shm vs a group per worker",
      fmt("%s (%s vs %s ms)", times(tail), num(zipf("shm_p999_ms"), 1),
          num(zipf("worker_p999_ms"), 1)),
      "<= 1.5x", tail, at_most(1.5), true)
end

---------------------------------------------------------------------------
-- Output

local function print_table(header, body)
  local w = {}
  for i, h in ipairs(header) do
    w[i] = #h
  end
  for _, r in ipairs(body) do
    for i, c in ipairs(r) do
      w[i] = math.max(w[i], #c)
    end
  end
  local function line(r)
    local cells = {}
    for i, c in ipairs(r) do
      cells[i] = c .. string.rep(" ", w[i] - #c)
    end
    print("| " .. table.concat(cells, " | ") .. " |")
  end
  line(header)
  local sep = {}
  for i = 1, #w do
    sep[i] = string.rep("-", w[i])
  end
  line(sep)
  for _, r in ipairs(body) do
    line(r)
  end
end

print(fmt("singleflight benchmarks, %s: %d run(s), medians; ratios within each run",
          meta.date or "?", nruns))
print(fmt("machine: %s, %s cores, %s; load average %s at the start, %s at the end",
          meta.cpu or "?", meta.cores or "?", meta.os or "?", meta.load_start or "?",
          meta.load_end or "?"))
local versions = {}
for _, k in ipairs { "lua-5.1", "lua-5.2", "lua-5.3", "lua-5.4", "lua-jit" } do
  if meta[k] then
    versions[#versions + 1] = meta[k]
  end
end
print("versions: " .. table.concat(versions, "; "))
print(fmt("compilers: %s; %s; golang.org/x/sync %s", meta.cc or "?",
          meta.go or "no go", meta.xsync or "?"))
if meta.scale and tonumber(meta.scale) ~= 1 then
  print(fmt("counts scaled by %s (smoke run: the numbers mean nothing)", meta.scale))
end
print()
print_table({ "target", "measured", "goal", "result" }, rows)

-- Everything else, for information.
local info = {}
local function add(what, ...)
  info[#info + 1] = { what, fmt(...) }
end
for _, v in ipairs { "5.4", "jit", "5.1", "5.2", "5.3" } do
  local s = "lua-" .. v
  if get(s .. ".call_ns") then
    local name = v == "jit" and "LuaJIT" or "Lua " .. v
    add(name .. " uncontended, ns per call",
        "g:call %s (in a coroutine %s), plain %s, pcall %s",
        num(get(s .. ".call_ns")), num(get(s .. ".call_co_ns")),
        num(get(s .. ".plain_ns")), num(get(s .. ".pcall_ns")))
    add(name .. " uncontended, fn yields once, ns per call",
        "g:call %s, plain %s", num(get(s .. ".yield_call_ns")),
        num(get(s .. ".yield_plain_ns")))
    add(name .. " one key, 100 coroutines, ns per call",
        "g:call %s (%s executions), plain %s (%s executions), for %s calls",
        num(get(s .. ".contended_call_ns")), num(get(s .. ".contended_call_execs"), 0),
        num(get(s .. ".contended_plain_ns")), num(get(s .. ".contended_plain_execs"), 0),
        num(get(s .. ".contended_calls"), 0))
    add(name .. " stampede of 1000, ms", "g:call %s, plain %s",
        num(get(s .. ".stampede_ms"), 2), num(get(s .. ".stampede_plain_ms"), 2))
    if get(s .. ".contended_floor_ns") then
      add(name .. " floor of a contended g:call: plain's flow over the C core "
          .. "(bench/floor_flight.lua)",
          "one key, 100 coroutines: %s ns per call (plain %s, g:call %s); "
          .. "stampede of 1000: %s ms (plain %s, g:call %s)",
          num(get(s .. ".contended_floor_ns")), num(get(s .. ".contended_plain_ns")),
          num(get(s .. ".contended_call_ns")), num(get(s .. ".stampede_floor_ms"), 2),
          num(get(s .. ".stampede_plain_ms"), 2), num(get(s .. ".stampede_ms"), 2))
    end
    add(name .. " bytes per in-flight call, Lua heap",
        "g:call %s, plain %s; a coroutine's guard alone %s",
        num(get(s .. ".inflight_lua_bytes")), num(get(s .. ".inflight_plain_bytes")),
        num(get(s .. ".inflight_guard_bytes")))
  end
end
if get("lua-5.4.floor_pcallk_ns") then
  local function f(name)
    return num(get("lua-5.4.floor_" .. name .. "_ns"))
  end
  add("Lua 5.4 floor of a C g:call (bench/floor.c), ns",
      "pcall(fn) %s; C method + lua_pcallk %s; + group check %s; + key and fn "
      .. "checks %s; + main thread test %s; + core acquire/finish %s; g:call %s",
      f("pcall"), f("pcallk"), f("group"), f("args"), f("thread"), f("core"), f("call"))
end
if get("lua-jit.floor_core_ns") then
  add("LuaJIT floor of an uncontended g:call (bench/floor_jit.lua), ns",
      "pcall(fn) %s; + coroutine.running %s; + the core's lead and finish "
      .. "(FFI, C) %s; g:call %s; plain %s",
      num(get("lua-jit.pcall_ns")), num(get("lua-jit.floor_running_ns")),
      num(get("lua-jit.floor_core_ns")), num(get("lua-jit.floor_call_ns")),
      num(get("lua-jit.plain_ns")))
end
if get("nginx.xworker_shm_p99_ms") then
  add("Across nginx workers, waiters' latency over the backend, ms",
      "shm p50 %s, p99 %s; a group per worker p50 %s, p99 %s (%s)",
      num(get("nginx.xworker_shm_p50_ms"), 2), num(get("nginx.xworker_shm_p99_ms"), 2),
      num(get("nginx.xworker_worker_p50_ms"), 2), num(get("nginx.xworker_worker_p99_ms"), 2),
      meta.nginx or "nginx")
end
if get("nginx.heap_sf_worst_ms") then
  add("Big heap, /ping latency (one request after another, 10 ms apart), ms",
      "singleflight worst %s, p99 %s (%s pings; at most %s executions a round); plain Lua "
      .. "worst %s, p99 %s (%s pings; at most %s executions a round); %s small tables",
      num(get("nginx.heap_sf_worst_ms"), 2), num(get("nginx.heap_sf_p99_ms"), 2),
      num(get("nginx.heap_sf_pings"), 0), num(get("nginx.heap_sf_execs"), 0),
      num(get("nginx.heap_plain_worst_ms"), 2), num(get("nginx.heap_plain_p99_ms"), 2),
      num(get("nginx.heap_plain_pings"), 0), num(get("nginx.heap_plain_execs"), 0),
      num(get("nginx.heap_tables"), 0))
end
if get("nginx.keys_lag_ms") then
  local worst_lag = worst_run("nginx.keys_lag_ms", function(l) return l end)
  add("Many keys over nginx workers: event-loop lag (a 10 ms timer: how late), ms",
      "median %s, worst run %s; spawning each worker's callers took %s ms, the load %s s",
      num(get("nginx.keys_lag_ms"), 1), num(worst_lag, 1), num(get("nginx.keys_spawn_ms"), 0),
      num(get("nginx.keys_took_s"), 2))
end
for _, v in ipairs { "jit", "5.4" } do
  local s = "lua-" .. v
  for _, shape in ipairs { { "small", "small table" }, { "string", "10 KB string" },
                           { "nested", "1000 nested entries" }, { "cycle", "a cycle" } } do
    local parts = {}
    for _, c in ipairs { "copy", "buffer", "raw" } do
      local ns_ = get(s .. ".codec_" .. shape[1] .. "_" .. c .. "_ns")
      if ns_ then
        parts[#parts + 1] = fmt("%s %s ns, %s bytes", c, num(ns_),
                                num(get(s .. ".codec_" .. shape[1] .. "_" .. c .. "_bytes"), 0))
      end
    end
    if #parts > 0 then
      add(fmt("%s codecs, round trip of %s", v == "jit" and "LuaJIT" or "Lua " .. v, shape[2]),
          "%s", table.concat(parts, "; "))
    end
  end
end
add("C core, private group (no locks), ns per acquire+finish", "%s",
    num(get("core.private_ns")))
if get("core.named_10_ns") then
  add("C core alone, opening a named group, ns",
      "with 10 others open %s; with %s others open %s",
      num(get("core.named_10_ns")), num(get("core.named_many"), 0),
      num(get("core.named_many_ns")))
end
add("C core vs Go, one key, 2 threads, calls/s", "core %s (%s%% executed), Go %s (%s%%)",
    num(get("core.same_ops")), num(get("core.same_execs")),
    num(get("go.same_ops")), num(get("go.same_execs")))
print()
print_table({ "also measured", "medians" }, info)

if smoke and #missing > 0 then
  io.stderr:write("bench: no data for: " .. table.concat(missing, "; ") .. "\n")
  os.exit(1)
end
