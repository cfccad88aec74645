-- The copas backend under the copas installed for this Lua (Debian's is
-- copas 1.x, with neither timers nor wakeup): many waiters on few
-- descriptors, and a state closed with a call still pending.
local singleflight = require "singleflight"
local schedulers = require "schedulers"

local function count(t)
  local n = 0
  for _ in pairs(t) do
    n = n + 1
  end
  return n
end

-- The descriptors this process holds open, or nil where /proc can't tell.
local pid
do
  local f = io.open("/proc/self/stat")
  if f then
    pid = tonumber((f:read("*l") or ""):match("^(%d+)"))
    f:close()
  end
end
local function open_fds()
  if not pid then
    return nil
  end
  local p = io.popen("ls /proc/" .. pid .. "/fd 2>/dev/null")
  local n = 0
  for _ in p:lines() do
    n = n + 1
  end
  p:close()
  return n
end

local function run_until(s, pred, what)
  local deadline = os.time() + 60
  local steps = 0
  while not pred() do
    assert(os.time() < deadline, "gave up waiting for " .. what
           .. (s.errs[1] and (": " .. tostring(s.errs[1])) or ""))
    steps = steps + 1
    s.step()
  end
  return steps
end

local probe, missing = schedulers.copas()

-- Closing a state finalizes what is left: a suspended leader reports its
-- abandonment and wakes its waiter through the backend from a finalizer,
-- while the state's C libraries (LuaSocket's among them) are unloaded.
-- LuaJIT crashed there. Run in child processes, one for each Lua.
describe("backend copas: a state closed with a leader and a waiter pending", function()
  local luas = {
    { bin = "luajit", v = "jit" }, { bin = "lua5.1", v = "5.1" },
    { bin = "lua5.2", v = "5.2" }, { bin = "lua5.3", v = "5.3" },
    { bin = "lua5.4", v = "5.4" },
  }

  local function sh(cmd)
    local p = assert(io.popen(cmd .. " 2>&1; echo \"rc=$?\""))
    local out = p:read("*a")
    p:close()
    return out
  end

  for _, l in ipairs(luas) do
    local has_lua = sh("command -v " .. l.bin .. " >/dev/null") == "rc=0\n"
    local has_copas = has_lua
      and sh(l.bin .. " -e 'require(\"socket\") require(\"copas\")' >/dev/null") == "rc=0\n"
    local f = io.open("build/" .. l.v .. "/singleflight/core.so")
    if f then
      f:close()
    end
    for _, mode in ipairs({ "fresh", "used", "early" }) do
      local name = ("%s exits cleanly (%s)"):format(l.bin, mode)
      if not has_lua then
        pending(name .. ": " .. l.bin .. " is not installed")
      elseif not has_copas then
        pending(name .. ": copas is not installed for " .. l.bin)
      elseif not f then
        pending(name .. ": build/" .. l.v .. " is not built")
      else
        it(name, function()
          -- a signal shows as rc=128+N
          assert.equal("pending\nrc=0\n",
                       sh("timeout 60 " .. l.bin .. " spec/copas_exit.lua " .. mode))
        end)
      end
    end
  end
end)

describe("backend copas, installed: many waiters", function()
  -- copas 1.x selects on every socket it waits on, and select can't take a
  -- descriptor past FD_SETSIZE (1024): waiters must not cost one each.
  local function crowd(opts)
    local N = 3000
    local s = assert(schedulers.copas())
    opts.backend = s.backend
    local g = singleflight.new(opts)
    local gate = s.gate()
    local execs, res = 0, {}
    local before = open_fds()
    for i = 1, N do
      s.spawn(function()
        res[i] = { g:call("crowd", function()
          execs = execs + 1
          gate.wait()
          return { "shared" }
        end) }
      end)
    end
    run_until(s, function() return g:stats().shared == N - 1 end, "the duplicates")
    local during = open_fds()
    if not opts.timeout then
      -- parked waiters keep the loop idle: a turn finds nothing to run
      local copas = require "copas"
      for _ = 1, 3 do
        assert.is_false(copas.step(0))
      end
    end
    assert.equal(0, count(res))
    gate.open()
    local steps = run_until(s, function() return count(res) == N end, "the answers")
    -- woken by the leader, not by a poll: the leader in one turn, its
    -- duplicates in the next
    assert.is_true(steps <= 3, "took " .. steps .. " turns")
    local after = open_fds()
    assert.same({}, s.errs)
    assert.equal(1, execs)
    for i = 1, N do
      assert.equal(res[1][1], res[i][1])
      assert.is_true(res[i][3])
    end
    assert.equal("shared", res[1][1][1])
    local st = g:stats()
    assert.equal(N, st.calls)
    assert.equal(1, st.executions)
    assert.equal(0, st.inflight)
    if before then
      -- the leader's gate holds one socket, the backend a few at most
      assert.is_true(during - before <= 4,
                     ("%d descriptors before, %d while waiting"):format(before, during))
      assert.is_true(after - before <= 4,
                     ("%d descriptors before, %d after"):format(before, after))
    end
  end

  local function check(name, fn)
    if missing then
      pending(name .. " (" .. missing .. ")")
    elseif probe.module.generation ~= "sockets" then
      pending(name .. " (this copas has wakeup: no sockets to count)")
    else
      it(name, fn)
    end
  end

  check("3000 waiters on one key share one execution on a few descriptors", function()
    crowd({})
  end)

  check("3000 waiters with a timeout do too", function()
    crowd({ timeout = 60 })
  end)
end)
