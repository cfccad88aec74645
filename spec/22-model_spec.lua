-- A randomised test against a model.
--
-- A driver in this state makes random moves on groups (private and
-- process-wide), keys, coroutines of this state (run by a round-robin
-- scheduler, backend "coroutine") and worker threads (each its own Lua
-- state, fed commands through a channel): new calls, releases of running
-- calls with a value, an error table, an error string or a function,
-- forgets, timeouts (handles with timeout = 0, with on_timeout "error" and
-- "run") and abandoned leaders (coroutine closed or collected). After each
-- move it waits for the threads to settle, then checks every result and
-- every counter of stats() against a plain model of what must happen.
--
-- Seeded and reproducible: SINGLEFLIGHT_SEED=n replays a run (which of
-- several waiting threads takes over an abandoned call is up to the OS, and
-- the model follows whichever does); SINGLEFLIGHT_MODEL_STEPS and
-- SINGLEFLIGHT_MODEL_ROUNDS change its length.
local X = require "xthreads"
local singleflight = require "singleflight"
local T = X.T

local SEED = tonumber(os.getenv("SINGLEFLIGHT_SEED")) or (os.time() % 1000000 + 1)
local STEPS = tonumber(os.getenv("SINGLEFLIGHT_MODEL_STEPS")) or 250
local ROUNDS = tonumber(os.getenv("SINGLEFLIGHT_MODEL_ROUNDS")) or 3
local NWORKERS = 3
local KEYS = { "a", "b", 7 }
local KINDS = { "value", "error", "errstr", "func" }
local TIMEOUT = singleflight.TIMEOUT

local function prng(seed)
  local s = seed % 2147483646 + 1
  return function(n)
    s = (s * 16807) % 2147483647
    return s % n + 1
  end
end

-- What a worker runs: one call at a time, as told by its inbox.
local WORKER = [[
local n1, n2, inbox, outbox, w = ...
local handles = {
  N1 = singleflight.group(n1),
  N2 = singleflight.group(n2, { timeout = 0, on_timeout = "run" }),
}
local function describe(ok, v, err, shared)
  if ok then
    return { ok = true, vtype = type(v), vfrom = type(v) == "table" and v.from or nil,
             err = err, shared = shared }
  end
  if singleflight.is_panic(v) then
    local value = v.value
    return { ok = false, panic = true, key = v.key,
             pboom = type(value) == "table" and value.boom or nil,
             pstr = type(value) == "string" and value or nil,
             tb = type(v.traceback) == "string" }
  end
  return { ok = false, panic = false, msg = tostring(v) }
end
while true do
  local ok, cmd, id, gname, key = inbox:pop(GUARD)
  assert(ok, "worker " .. w .. ": no command")
  if cmd == "quit" then break end
  assert(cmd == "call", "worker " .. w .. ": unexpected " .. tostring(cmd))
  local function fn()
    outbox:push("started", id, w)
    local ok2, what, rid, kind = inbox:pop(GUARD)
    assert(ok2 and rid == id, "worker " .. w .. ": no release for " .. id)
    if what == "abandon" then
      coroutine.yield("abandon")
      error("resumed after being abandoned")
    end
    if kind == "value" then return { from = id }, "e" .. id
    elseif kind == "error" then error({ boom = id })
    elseif kind == "errstr" then error("str" .. id, 0)
    end
    return function() end
  end
  -- no pcall around the call: Lua 5.1 can't yield across one; the
  -- coroutine catches the error instead
  local co = coroutine.create(function()
    local h = handles[gname]
    return describe(true, h:call(key, fn))
  end)
  local okr, res = coroutine.resume(co)
  if not okr then
    res = describe(false, res)
  end
  if coroutine.status(co) == "suspended" then
    assert(res == "abandon")
    if coroutine.close then coroutine.close(co) end
    co = nil -- luacheck: ignore
    collectgarbage()
    collectgarbage()
    outbox:push("abandoned", id, w)
  else
    outbox:push("result", id, w, res)
  end
end
return "bye"
]]

local STAT_NAMES = { "calls", "executions", "shared", "panics", "timeouts", "abandoned",
                     "forgotten", "inflight" }

local function run_model(seed, steps)
  local rand = prng(seed)
  local log = {}
  local function note(...)
    log[#log + 1] = string.format(...)
    if #log > 40 then table.remove(log, 1) end
  end
  local function fail(msg)
    error(string.format("model (SINGLEFLIGHT_SEED=%d): %s\nlast moves:\n  %s", seed, msg,
                        table.concat(log, "\n  ")), 0)
  end
  local function check(cond, msg, ...)
    if not cond then fail(string.format(msg, ...)) end
  end

  -- groups: the driver's handles and, for the named ones, the workers' options
  local n1, n2 = X.name("model-n1"), X.name("model-n2")
  local G = {
    P = { h = singleflight.new { backend = "coroutine" }, waits = true },
    Q = { h = singleflight.new { backend = "coroutine", timeout = 0 } },
    R = { h = singleflight.new { backend = "coroutine", timeout = 0, on_timeout = "run" },
          run = true },
    N1 = { h = singleflight.group(n1, { backend = "coroutine" }), waits = true,
           named = true, wwaits = true },
    N2 = { h = singleflight.group(n2, { backend = "coroutine", timeout = 0 }),
           named = true, wrun = true },
  }
  local GNAMES = { "P", "Q", "R", "N1", "N2" }
  for _, name in ipairs(GNAMES) do
    local g = G[name]
    g.name = name
    g.current = {}
    g.count = {}
    for _, s in ipairs(STAT_NAMES) do g.count[s] = 0 end
  end

  -- workers
  local outbox = T.channel()
  local workers = {}
  for w = 1, NWORKERS do
    local inbox = T.channel()
    workers[w] = { inbox = inbox, busy = false,
                   thread = X.spawn(WORKER, n1, n2, inbox, outbox, w) }
  end

  -- messages from the workers, kept until the driver asks for them
  local pending = {}
  local function await(pred, what)
    for i, m in ipairs(pending) do
      if pred(m) then
        table.remove(pending, i)
        return m
      end
    end
    while true do
      local m = X.pack(outbox:pop(X.GUARD))
      check(m[1], "no message from the workers: waiting for %s", what)
      m = { kind = m[2], id = m[3], w = m[4], res = m[5] }
      if pred(m) then return m end
      pending[#pending + 1] = m
    end
  end

  -- callers and executions
  local callers, execs = {}, {}
  local nextid = 0
  local started, release, results = {}, {}, {}
  local values, errvals, funcs = {}, {}, {}
  local cos = {} -- id -> coroutine of this state's callers

  local function new_exec(g, skey, leader, unshared)
    local e = { g = g, skey = skey, leader = leader, where = leader.where, waiters = {},
                joins = 0, unshared = unshared, running = true }
    execs[#execs + 1] = e
    leader.exec, leader.role = e, "leader"
    g.count.executions = g.count.executions + 1
    if not unshared then
      g.current[skey] = e
      g.count.inflight = g.count.inflight + 1
    end
    return e
  end

  local function join_exec(e, c)
    e.waiters[#e.waiters + 1] = c
    e.joins = e.joins + 1
    c.exec, c.role = e, "waiter"
    e.g.count.shared = e.g.count.shared + 1
  end

  local function unlink(e)
    if e.g.current[e.skey] == e then
      e.g.current[e.skey] = nil
      e.g.count.inflight = e.g.count.inflight - 1
    end
  end

  local function main_fn(id)
    return function()
      started[id] = (started[id] or 0) + 1
      while not release[id] do coroutine.yield() end
      local kind = release[id]
      if kind == "value" then return values[id], "e" .. id
      elseif kind == "error" then error(errvals[id])
      elseif kind == "errstr" then error("str" .. id, 0)
      end
      return funcs[id]
    end
  end

  -- runs this state's coroutines round-robin, in id order, until a round
  -- changes nothing
  local function run_main()
    local function snapshot()
      local n = 0
      for _ in pairs(results) do n = n + 1 end
      for _, v in pairs(started) do n = n + v end
      return n
    end
    for _ = 1, 1000 do
      local before = snapshot()
      local ids = {}
      for id in pairs(cos) do ids[#ids + 1] = id end
      table.sort(ids)
      for _, id in ipairs(ids) do
        local co = cos[id]
        if co and coroutine.status(co) == "suspended" then
          local ok, e = coroutine.resume(co)
          if not ok then
            results[id] = X.pack(false, e)
          end
          if coroutine.status(co) == "dead" then cos[id] = nil end
        end
      end
      if snapshot() == before then return end
    end
    fail("this state's coroutines never settle")
  end

  local function stats_settle()
    for _, name in ipairs(GNAMES) do
      local g = G[name]
      local st
      local function same()
        st = g.h:stats()
        for _, s in ipairs(STAT_NAMES) do
          if st[s] ~= g.count[s] then return false end
        end
        return true
      end
      local waited = 0
      while not same() do
        if waited > X.GUARD then
          local diff = {}
          for _, s in ipairs(STAT_NAMES) do
            if st[s] ~= g.count[s] then
              diff[#diff + 1] = string.format("%s %s (model %d)", s, tostring(st[s]), g.count[s])
            end
          end
          fail("group " .. name .. " stats: " .. table.concat(diff, ", "))
        end
        T.sleep(0.0005)
        waited = waited + 0.0005
      end
    end
  end

  -- A result in the form the workers describe theirs.
  local function describe_main(r)
    if r[1] then
      local v = r[2]
      return { ok = true, vtype = type(v), vfrom = type(v) == "table" and v.from or nil,
               err = r[3], shared = r[4], value = v }
    end
    local e = r[2]
    if singleflight.is_panic(e) then
      local value = e.value
      return { ok = false, panic = true, key = e.key, value = value,
               pboom = type(value) == "table" and value.boom or nil,
               pstr = type(value) == "string" and value or nil,
               tb = type(e.traceback) == "string" }
    end
    return { ok = false, panic = false, msg = tostring(e) }
  end

  local function verify(c, got)
    local e = c.exec
    local L = e.leader.id
    local kind = e.kind
    local cross = c.where ~= e.where
    local who = string.format("caller %d (%s, %s %s, %s of exec led by %d, %s)", c.id,
                              tostring(c.where), e.g.name, e.skey, c.role, L,
                              tostring(kind))
    c.done = true
    if c.timedout then
      check(got.ok and got.vtype == "nil" and got.err == TIMEOUT and got.shared == false,
            "%s: expected a timeout", who)
      return
    end
    local shared = true
    if c.role == "leader" then shared = e.joins > 0 end
    if kind == "value" then
      check(got.ok, "%s: expected a value, got an error %s", who, tostring(got.msg))
      check(got.vtype == "table" and got.vfrom == L, "%s: value from %s", who,
            tostring(got.vfrom))
      check(got.err == "e" .. L, "%s: err %s", who, tostring(got.err))
      check(got.shared == shared, "%s: shared %s, expected %s", who, tostring(got.shared),
            tostring(shared))
      if not cross and c.where == "main" then
        check(rawequal(got.value, values[L]), "%s: not the leader's own table", who)
      end
    elseif kind == "func" and cross then
      check(not got.ok and not got.panic, "%s: expected an error that a function can't cross",
            who)
      check(got.msg:find('key "' .. e.skey .. '"', 1, true) and got.msg:find("function", 1, true),
            "%s: unclear message %s", who, got.msg)
    elseif kind == "func" then
      check(got.ok and got.vtype == "function" and got.shared == shared,
            "%s: expected the function", who)
      if c.where == "main" then
        check(rawequal(got.value, funcs[L]), "%s: not the leader's function", who)
      end
    else
      check(not got.ok and got.panic, "%s: expected a panic error", who)
      check(got.key == e.skey, "%s: panic key %s", who, tostring(got.key))
      check(got.tb, "%s: no traceback", who)
      if kind == "error" then
        check(got.pboom == L, "%s: panic value from %s", who, tostring(got.pboom))
        if not cross and c.where == "main" then
          check(rawequal(got.value, errvals[L]), "%s: not the raised table itself", who)
        end
      else
        check(got.pstr == "str" .. L, "%s: panic value %s", who, tostring(got.pstr))
      end
    end
  end

  local function new_caller(where, g, key)
    nextid = nextid + 1
    local c = { id = nextid, where = where, g = g, key = key, skey = tostring(key) }
    callers[c.id] = c
    g.count.calls = g.count.calls + 1
    return c
  end

  -- moves -------------------------------------------------------------------

  local function main_call()
    local g = G[GNAMES[rand(#GNAMES)]]
    local key = KEYS[rand(#KEYS)]
    local skey = tostring(key)
    local cur = g.current[skey]
    if cur and g.waits and cur.where ~= "main" then
      return false -- it would block this thread on another's call
    end
    local c = new_caller("main", g, key)
    local id = c.id
    values[id], errvals[id], funcs[id] = { from = id }, { boom = id }, function() end
    note("main call %d %s %s", id, g.name, skey)
    local expect_start = false
    if not cur then
      new_exec(g, skey, c)
      expect_start = true
    elseif g.waits then
      join_exec(cur, c)
    else
      g.count.shared = g.count.shared + 1
      g.count.timeouts = g.count.timeouts + 1
      cur.joins = cur.joins + 1 -- joined, then gave up: the leader's shared
      if g.run then
        new_exec(g, skey, c, true)
        expect_start = true
      else
        c.timedout, c.exec, c.role = true, cur, "waiter"
      end
    end
    local h, fn = g.h, main_fn(id)
    cos[id] = coroutine.create(function() -- errors end it: see run_main
      results[id] = X.pack(true, h:call(key, fn))
    end)
    run_main()
    check((started[id] or 0) == (expect_start and 1 or 0), "caller %d: fn ran %d times",
          id, started[id] or 0)
    if c.timedout then
      check(results[id], "caller %d: no result after a timeout", id)
      verify(c, describe_main(results[id]))
    else
      check(not results[id], "caller %d: a result too early", id)
    end
    return true
  end

  local function worker_call()
    local idle = {}
    for w = 1, NWORKERS do
      if not workers[w].busy then idle[#idle + 1] = w end
    end
    if #idle == 0 then return false end
    local w = idle[rand(#idle)]
    local g = rand(2) == 1 and G.N1 or G.N2
    local key = KEYS[rand(#KEYS)]
    local skey = tostring(key)
    local cur = g.current[skey]
    local c = new_caller(w, g, key)
    note("worker %d call %d %s %s", w, c.id, g.name, skey)
    workers[w].busy = c
    workers[w].inbox:push("call", c.id, g.name, key)
    if not cur then
      new_exec(g, skey, c)
      await(function(m) return m.kind == "started" and m.id == c.id end, "a start")
    elseif g.wwaits then
      join_exec(cur, c)
    else -- the workers' handle on N2: timeout 0, on_timeout "run"
      g.count.shared = g.count.shared + 1
      g.count.timeouts = g.count.timeouts + 1
      cur.joins = cur.joins + 1 -- joined, then gave up: the leader's shared
      new_exec(g, skey, c, true)
      await(function(m) return m.kind == "started" and m.id == c.id end, "an unshared start")
    end
    return true
  end

  local function running_execs(filter)
    local list = {}
    for _, e in ipairs(execs) do
      if e.running and (not filter or filter(e)) then list[#list + 1] = e end
    end
    return list
  end

  -- every caller of e that is still waiting, and its leader, get the outcome
  local function finish_exec(e)
    e.running = false
    unlink(e)
    if e.kind == "error" or e.kind == "errstr" then
      e.g.count.panics = e.g.count.panics + 1
    end
    local everyone = { e.leader }
    for _, c in ipairs(e.waiters) do everyone[#everyone + 1] = c end
    for _, c in ipairs(everyone) do
      if c.where == "main" then
        check(results[c.id], "caller %d got no result", c.id)
        verify(c, describe_main(results[c.id]))
      else
        local m = await(function(m) return m.kind == "result" and m.id == c.id end,
                        "the result of caller " .. c.id)
        verify(c, m.res)
        workers[c.where].busy = false
      end
    end
  end

  local function release_one()
    local list = running_execs()
    if #list == 0 then return false end
    local e = list[rand(#list)]
    e.kind = KINDS[rand(#KINDS)]
    note("release exec of %d (%s %s) with %s, %d waiters", e.leader.id, e.g.name, e.skey,
         e.kind, #e.waiters)
    if e.where == "main" then
      release[e.leader.id] = e.kind
      run_main()
    else
      workers[e.where].inbox:push("release", e.leader.id, e.kind)
    end
    finish_exec(e)
    return true
  end

  local function forget()
    local g = G[GNAMES[rand(#GNAMES)]]
    local skey = tostring(KEYS[rand(#KEYS)])
    local cur = g.current[skey]
    note("forget %s %s", g.name, skey)
    local r = g.h:forget(skey)
    check(r == (cur ~= nil), "forget %s %s gave %s", g.name, skey, tostring(r))
    if cur then
      unlink(cur)
      g.count.forgotten = g.count.forgotten + 1
    end
    return true
  end

  local function abandon()
    local list = running_execs(function(e) return not e.unshared end)
    if #list == 0 then return false end
    local e = list[rand(#list)]
    local g, skey = e.g, e.skey
    local after = g.current[skey] ~= e and g.current[skey] or nil
    local mains, foreigns = {}, {}
    for _, c in ipairs(e.waiters) do
      if c.where == "main" then mains[#mains + 1] = c else foreigns[#foreigns + 1] = c end
    end
    table.sort(mains, function(x, y) return x.id < y.id end) -- the order they resume in
    if after and #mains > 0 and after.where ~= "main" then return false end
    if not after and #mains > 0 and #foreigns > 0 then return false end
    note("abandon exec of %d (%s %s), %d waiters here, %d in threads", e.leader.id, g.name,
         skey, #mains, #foreigns)
    e.running = false
    e.leader.done = true
    unlink(e)
    g.count.abandoned = g.count.abandoned + 1
    -- the leader goes away
    if e.where == "main" then
      local co = cos[e.leader.id]
      cos[e.leader.id] = nil
      if coroutine.close then
        assert(coroutine.close(co))
      end
      co = nil -- luacheck: ignore
      collectgarbage()
      collectgarbage()
    else
      workers[e.where].inbox:push("abandon", e.leader.id)
      await(function(m) return m.kind == "abandoned" and m.id == e.leader.id end,
            "the abandonment")
      workers[e.where].busy = false
    end
    -- its waiters come back: join the call in flight, or one of them leads
    local function rejoin(c) join_exec(after, c) end
    if after then
      for _, c in ipairs(e.waiters) do rejoin(c) end
    elseif #foreigns > 0 then
      local m = await(function(m)
        if m.kind ~= "started" then return false end
        for _, c in ipairs(foreigns) do
          if c.id == m.id then return true end
        end
        return false
      end, "a waiter taking over")
      local winner = callers[m.id]
      after = new_exec(g, skey, winner)
      for _, c in ipairs(foreigns) do
        if c ~= winner then rejoin(c) end
      end
    elseif #mains > 0 then
      after = new_exec(g, skey, mains[1]) -- the first resumed takes over
      for i = 2, #mains do rejoin(mains[i]) end
    end
    run_main()
    for _, c in ipairs(mains) do
      local n = started[c.id] or 0
      check(n == (c.role == "leader" and 1 or 0), "caller %d: fn ran %d times after the "
            .. "abandonment", c.id, n)
    end
    return true
  end

  local moves = {
    { main_call, 30 }, { worker_call, 20 }, { release_one, 25 }, { forget, 8 },
    { abandon, 10 },
  }
  local total = 0
  for _, m in ipairs(moves) do total = total + m[2] end
  local function pick()
    local r = rand(total)
    for _, m in ipairs(moves) do
      if r <= m[2] then return m[1] end
      r = r - m[2]
    end
  end

  local made = {}
  local names = { [main_call] = "main calls", [worker_call] = "thread calls",
                  [release_one] = "releases", [forget] = "forgets", [abandon] = "abandons" }
  for _ = 1, steps do
    local move = #running_execs() > 12 and release_one or pick()
    for _ = 1, 20 do
      if move() then
        made[names[move]] = (made[names[move]] or 0) + 1
        break
      end
      move = pick()
    end
    stats_settle()
  end
  -- wind down: release everything, stop the workers
  while release_one() do stats_settle() end
  for id, c in pairs(callers) do
    check(c.done, "caller %d never finished", id)
  end
  stats_settle()
  for w = 1, NWORKERS do
    workers[w].inbox:push("quit")
    check(X.join(workers[w].thread) == "bye", "worker %d", w)
  end
  check(#pending == 0, "%d unexpected messages from the workers", #pending)
  for _, name in ipairs(GNAMES) do G[name].h:close() end
  return made
end

describe("the model test", function()
  it("agrees with the model, seed " .. SEED .. " (SINGLEFLIGHT_SEED to replay)", function()
    print(string.format("\nmodel: seed %d, %d rounds of %d steps (SINGLEFLIGHT_SEED=%d to replay)",
                        SEED, ROUNDS, STEPS, SEED))
    for round = 1, ROUNDS do
      local made = run_model(SEED + round - 1, STEPS)
      local parts = {}
      for what, n in pairs(made) do parts[#parts + 1] = n .. " " .. what end
      table.sort(parts)
      print("model: round " .. round .. ": " .. table.concat(parts, ", "))
    end
  end)
end)
