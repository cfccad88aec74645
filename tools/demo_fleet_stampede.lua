-- demo_fleet_stampede.lua: the stampedes of `make demo-fleet`
-- (tools/demo_fleet.sh).
--
--   lua tools/demo_fleet_stampede.lua REQUESTS ROUNDS ORIGIN_MS PORT...
--
-- Each round sends REQUESTS requests at once for one fresh key, spread in
-- turn over the nginx instances listening on PORT..., to their /stampede:
-- ROUNDS rounds with a group per instance (shm), then ROUNDS with the
-- fleet's group (shm + redis). It prints the executions of the origin per
-- stampede (as the Redis counter has them), the waiters' latency over the
-- origin call they shared (from its end to their answer), and the requests'
-- whole latency as this client saw it. Needs LuaSocket.
local socket = require "socket"

local USAGE = "usage: demo_fleet_stampede.lua REQUESTS ROUNDS ORIGIN_MS PORT..."
local REQUESTS = assert(tonumber(arg[1]), USAGE)
local ROUNDS = assert(tonumber(arg[2]), USAGE)
local ORIGIN_MS = assert(tonumber(arg[3]), USAGE)
local ports = {}
for i = 4, #arg do
  ports[#ports + 1] = assert(tonumber(arg[i]), USAGE)
end
assert(#ports > 0, USAGE)

local function parse(text)
  local status = tonumber(text:match("^HTTP/%d%.%d (%d+)"))
  local body = text:match("\r\n\r\n(.*)$") or ""
  local fields = {}
  for k, v in body:gmatch("([%w_]+)=([^\n]*)") do
    fields[k] = v
  end
  return status, fields
end

-- Sends each request { port, path } at once (all connections opened and
-- written before any answer is read); returns, per request, the answer's
-- fields (nil when it failed) and its latency in ms.
local function batch(requests)
  local conns, bufs, index, started, took = {}, {}, {}, {}, {}
  local failed = {}
  for i, r in ipairs(requests) do
    local c = assert(socket.tcp())
    c:settimeout(5)
    started[i] = socket.gettime()
    local ok = c:connect("127.0.0.1", r[1])
    ok = ok and c:send("GET " .. r[2] .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    if ok then
      c:settimeout(0)
      conns[#conns + 1], bufs[i], index[c] = c, {}, i
    else
      c:close()
      failed[i] = true
    end
  end
  local pending = {}
  for i, c in ipairs(conns) do
    pending[i] = c
  end
  local deadline = socket.gettime() + 30
  while #pending > 0 and socket.gettime() < deadline do
    local readable = socket.select(pending, nil, 0.1)
    local now = socket.gettime()
    for _, c in ipairs(readable) do
      local i = index[c]
      local data, err, part = c:receive(65536)
      data = data or part
      if data and #data > 0 then
        table.insert(bufs[i], data)
      end
      if err == "closed" then
        took[i] = (now - started[i]) * 1000
        c:close()
        for j, p in ipairs(pending) do
          if p == c then
            table.remove(pending, j)
            break
          end
        end
      end
    end
  end
  for _, c in ipairs(pending) do
    c:close()
  end
  local out = {}
  for i = 1, #requests do
    if not failed[i] and took[i] then
      local status, fields = parse(table.concat(bufs[i]))
      if status == 200 then
        out[i] = { fields = fields, ms = took[i] }
      end
    end
    out[i] = out[i] or false
  end
  return out
end

local function get(port, path)
  local res = batch { { port, path } }[1]
  return res and res.fields
end

local function quantile(t, q)
  table.sort(t)
  return t[math.max(1, math.ceil(q * #t))]
end

local run_id = ("%x"):format(math.floor(socket.gettime() * 1000) % 0x1000000)

local MODES = {
  { mode = "instance", title = "a group per instance (shm)" },
  { mode = "fleet", title = "shm + redis (fleet)" },
}

-- One stampede of `n` requests on `key`; adds what it saw to `r`.
local function stampede(mode, key, n, r)
  local requests = {}
  for i = 1, n do
    requests[i] = { ports[(i - 1) % #ports + 1], ("/stampede?mode=%s&key=%s"):format(mode, key) }
  end
  local led = 0
  for _, res in ipairs(batch(requests)) do
    if not res then
      r.failed = r.failed + 1
    else
      local f = res.fields
      if f.led == "true" then
        led = led + 1
      else
        r.overs[#r.overs + 1] = tonumber(f.over_ms)
      end
      r.totals[#r.totals + 1] = res.ms
      if f.pid then
        r.fallbacks[f.pid] = math.max(r.fallbacks[f.pid] or 0, tonumber(f.fallbacks) or 0)
      end
    end
  end
  local counted = get(ports[1], "/executions?key=" .. key)
  local execs = counted and tonumber(counted.executions)
  if not execs then
    r.failed = r.failed + 1
    execs = led
  elseif execs ~= led then
    -- the counter and the answers disagree: say so rather than pick one
    r.mismatches = (r.mismatches or 0) + 1
  end
  return execs
end

-- Warm-up, not reported: each worker's first calls load the code, and in
-- fleet mode connect to Redis and load its scripts. Then the rounds.
local function run()
  for _, m in ipairs(MODES) do
    local scratch = { overs = {}, totals = {}, fallbacks = {}, failed = 0 }
    stampede(m.mode, ("warmup-%s-%s"):format(m.mode, run_id), 8 * #ports, scratch)
  end
  local results = {}
  for _, m in ipairs(MODES) do
    local r = { execs = {}, overs = {}, totals = {}, fallbacks = {}, failed = 0 }
    results[m.mode] = r
    io.write(("  %-27s executions"):format(m.title .. ":"))
    for round = 1, ROUNDS do
      local key = ("%s-%s-%d"):format(m.mode, run_id, round)
      r.execs[round] = stampede(m.mode, key, REQUESTS, r)
      io.write(round > 1 and ", " or " ", r.execs[round])
      io.flush()
    end
    io.write("\n")
  end
  return results
end

local ok, results = pcall(run)
if not ok then
  if tostring(results):find("interrupted!", 1, true) then -- Ctrl-C
    io.write("\n")
    os.exit(130)
  end
  error(results, 0)
end
print()

local function row(what, fmt, field)
  local cells = {}
  for i, m in ipairs(MODES) do
    cells[i] = field(results[m.mode], fmt)
  end
  print(("  %-30s %24s %24s"):format(what, cells[1], cells[2]))
end

local function mean(t)
  local s = 0
  for _, v in ipairs(t) do
    s = s + v
  end
  return #t > 0 and s / #t or 0 / 0
end

local function q(list, p)
  return function(r, fmt)
    local v = quantile(r[list], p)
    return v and fmt:format(v) or "-"
  end
end

print(("  %-30s %24s %24s"):format("", MODES[1].title, MODES[2].title))
row("executions per stampede", "%.1f", function(r, fmt) return fmt:format(mean(r.execs)) end)
row("waiters p50 over the origin", "%.2f ms", q("overs", 0.5))
row("waiters p99 over the origin", "%.2f ms", q("overs", 0.99))
row(("requests p50 (origin %d ms)"):format(ORIGIN_MS), "%.1f ms", q("totals", 0.5))
row(("requests p99 (origin %d ms)"):format(ORIGIN_MS), "%.1f ms", q("totals", 0.99))

local fallbacks, failed = 0, 0
for _, m in ipairs(MODES) do
  if results[m.mode].mismatches then
    print(("  (%s: in %d stampede(s) the Redis counter and the answers saying they ran"
           .. " the origin disagree)"):format(m.title, results[m.mode].mismatches))
  end
  for _, n in pairs(results[m.mode].fallbacks) do
    fallbacks = fallbacks + n
  end
  failed = failed + results[m.mode].failed
end
if fallbacks > 0 then
  print(("  (%d fleet call(s), warm-up included, found Redis unusable and ran in their"
         .. " instance)"):format(fallbacks))
end
if failed > 0 then
  print(("  (%d request(s) failed)"):format(failed))
  os.exit(1)
end
