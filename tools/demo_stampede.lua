-- demo_stampede.lua: the stampedes of `make demo` (tools/demo.sh).
--
--   lua tools/demo_stampede.lua PORT [REQUESTS] [ROUNDS]
--
-- Each round sends REQUESTS requests at once for one fresh key to nginx's
-- /stampede, once with a group per worker and once with a group over a
-- lua_shared_dict, and prints the executions per stampede (the requests
-- that led) and the other requests' latency over the upstream call they
-- shared, side by side. Needs LuaSocket.
local socket = require "socket"

local port = assert(tonumber(arg[1]), "usage: demo_stampede.lua PORT [REQUESTS] [ROUNDS]")
local REQUESTS = tonumber(arg[2]) or 200
local ROUNDS = tonumber(arg[3]) or 5

-- Sends every path at once; returns the bodies' key=value fields.
local function batch(paths)
  local conns, bufs, index = {}, {}, {}
  for i, path in ipairs(paths) do
    local c = assert(socket.tcp())
    c:settimeout(5)
    assert(c:connect("127.0.0.1", port))
    assert(c:send("GET " .. path .. " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"))
    c:settimeout(0)
    conns[i], bufs[i], index[c] = c, {}, i
  end
  local pending = {}
  for i, c in ipairs(conns) do
    pending[i] = c
  end
  local deadline = socket.gettime() + 30
  while #pending > 0 and socket.gettime() < deadline do
    local readable = socket.select(pending, nil, 0.1)
    for _, c in ipairs(readable) do
      local data, err, part = c:receive(65536)
      data = data or part
      if data and #data > 0 then
        table.insert(bufs[index[c]], data)
      end
      if err == "closed" then
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
  local out = {}
  for i = 1, #paths do
    local fields = {}
    local body = table.concat(bufs[i]):match("\r\n\r\n(.*)$") or ""
    for k, v in body:gmatch("([%w_]+)=([^\n]*)") do
      fields[k] = v
    end
    out[i] = fields
  end
  for _, c in ipairs(pending) do
    c:close()
  end
  return out
end

local function quantile(t, q)
  table.sort(t)
  return t[math.max(1, math.ceil(q * #t))]
end

local results = { worker = { execs = 0, overs = {} }, shm = { execs = 0, overs = {} } }
local failed = 0
for round = 1, ROUNDS do
  for _, mode in ipairs { "worker", "shm" } do
    local paths = {}
    for i = 1, REQUESTS do
      paths[i] = ("/stampede?mode=%s&key=%s-%d-%d"):format(mode, mode, round, os.time())
    end
    local r = results[mode]
    for _, f in ipairs(batch(paths)) do
      if f.led == "true" then
        r.execs = r.execs + 1
      elseif f.over_ms then
        r.overs[#r.overs + 1] = tonumber(f.over_ms)
      else
        failed = failed + 1
      end
    end
  end
end

local function row(what, a, b)
  print(("  %-24s %20s %20s"):format(what, a, b))
end
local w, s = results.worker, results.shm
row("", "a group per worker", "shm (one per nginx)")
row("executions per stampede", ("%.1f"):format(w.execs / ROUNDS), ("%.1f"):format(s.execs / ROUNDS))
for _, q in ipairs { 0.5, 0.9, 0.99 } do
  row(("waiters p%d over upstream"):format(q * 100),
      ("%.2f ms"):format(quantile(w.overs, q) or 0 / 0),
      ("%.2f ms"):format(quantile(s.overs, q) or 0 / 0))
end
if failed > 0 then
  print(("  (%d requests failed)"):format(failed))
end
