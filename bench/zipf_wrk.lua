--- wrk's script for bench/nginx_zipf_bench.lua: each request asks for
-- <url's path>?id=<k>, k drawn from 1..IDS with a Zipf-like law (the
-- chance of k proportional to 1 / k^S). wrk runs it under its own
-- LuaJIT, once per thread; done() prints "zipf <name> <value>" lines.
--
--   wrk -t2 -c200 -d10s -s bench/zipf_wrk.lua http://127.0.0.1:PORT/shm
-- luacheck: globals wrk setup init request done seed

local IDS, S = 100000, 1.1

local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("seed", threads)
end

local cdf, requests = {}, {}

function init()
  local total = 0
  for k = 1, IDS do
    total = total + k ^ -S
    cdf[k] = total
  end
  for k = 1, IDS do
    cdf[k] = cdf[k] / total
  end
  math.randomseed(1000 + (seed or 0))
end

local function draw()
  local u, lo, hi = math.random(), 1, IDS
  while lo < hi do -- the first k with cdf[k] >= u
    local mid = math.floor((lo + hi) / 2)
    if cdf[mid] < u then
      lo = mid + 1
    else
      hi = mid
    end
  end
  return lo
end

function request()
  local k = draw()
  local r = requests[k]
  if not r then
    r = wrk.format(nil, wrk.path .. "?id=" .. k)
    requests[k] = r
  end
  return r
end

function done(summary, latency)
  local e = summary.errors
  local lines = {
    ("zipf requests %d"):format(summary.requests),
    ("zipf secs %.3f"):format(summary.duration / 1e6),
    ("zipf errors %d"):format(e.connect + e.read + e.write + e.status + e.timeout),
    ("zipf p50_ms %.3f"):format(latency:percentile(50) / 1000),
    ("zipf p99_ms %.3f"):format(latency:percentile(99) / 1000),
    ("zipf p999_ms %.3f"):format(latency:percentile(99.9) / 1000),
  }
  io.write(table.concat(lines, "\n"), "\n")
end
