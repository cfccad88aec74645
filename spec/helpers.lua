-- Shared helpers for the specs.
local helpers = {}
local unpack = table.unpack or unpack -- luacheck: ignore 143

--- Runs coroutines round-robin until all are dead or `limit` rounds pass.
-- Each entry of `fns` becomes a coroutine; errors are collected.
-- Returns the number of rounds and a table of errors by index.
function helpers.run_all(fns, limit)
  limit = limit or 100000
  local cos, errs = {}, {}
  for i, f in ipairs(fns) do
    cos[i] = coroutine.create(f)
  end
  local rounds = 0
  repeat
    local alive = false
    rounds = rounds + 1
    for i, co in ipairs(cos) do
      if coroutine.status(co) == "suspended" then
        local ok, e = coroutine.resume(co)
        if not ok then
          errs[i] = e
        end
        if coroutine.status(co) ~= "dead" then
          alive = true
        end
      end
    end
  until not alive or rounds >= limit
  assert(rounds < limit, "coroutines still alive after " .. limit .. " rounds")
  return rounds, errs
end

--- Packs the values it is given, nils included: { n = count, ... }.
function helpers.pack(...)
  return { n = select("#", ...), ... }
end

--- A scheduler helper: a table of coroutines you add to while running.
-- s.spawn(f, ...) adds a coroutine; s.go(f, ...) adds one and returns a
-- task { co, done, ok, res = packed results, err }; s.round() resumes every
-- suspended coroutine once; s.run(limit) and s.run_until(pred, limit) run
-- rounds, bounded. Errors are collected in s.errs (and in the task).
function helpers.scheduler()
  local s = { cos = {}, errs = {}, tasks = {} }
  function s.spawn(f, ...)
    local args = { n = select("#", ...), ... }
    local co = coroutine.create(function() return f(unpack(args, 1, args.n)) end)
    s.cos[#s.cos + 1] = co
    return co
  end
  function s.go(f, ...)
    local args = { n = select("#", ...), ... }
    local task = { done = false }
    task.co = s.spawn(function()
      task.res = helpers.pack(f(unpack(args, 1, args.n)))
    end)
    s.tasks[task.co] = task
    return task
  end
  -- Resumes co once; returns true if it is still alive.
  function s.resume(co, ...)
    local ok, e = coroutine.resume(co, ...)
    local task = s.tasks[co]
    if not ok then
      s.errs[#s.errs + 1] = e
      if task then
        task.err = e
      end
    end
    if coroutine.status(co) == "dead" then
      if task then
        task.done, task.ok = true, ok
      end
      return false
    end
    return true
  end
  function s.round()
    local alive = 0
    for i = 1, #s.cos do
      local co = s.cos[i]
      if co and coroutine.status(co) == "suspended" and s.resume(co) then
        alive = alive + 1
      end
    end
    return alive
  end
  function s.run(limit)
    limit = limit or 100000
    local rounds = 0
    repeat
      rounds = rounds + 1
      local alive = s.round()
    until alive == 0 or rounds >= limit
    assert(rounds < limit, "coroutines still alive after " .. limit .. " rounds")
    return rounds
  end
  function s.run_until(pred, limit)
    limit = limit or 100000
    local rounds = 0
    while not pred() do
      rounds = rounds + 1
      assert(rounds <= limit, "condition not met after " .. limit .. " rounds")
      s.round()
    end
    return rounds
  end
  return s
end

--- A gate that coroutines wait at (yielding) until it is opened.
function helpers.gate()
  local gate = { opened = false, waiting = 0 }
  function gate.open()
    gate.opened = true
  end
  function gate.wait(limit)
    -- a hang guard in rounds: generous, as a wait with a timeout in
    -- seconds may take many fast rounds (LuaJIT compiles the loops)
    limit = limit or 10000000
    local n = 0
    gate.waiting = gate.waiting + 1
    while not gate.opened do
      n = n + 1
      assert(n <= limit, "gate never opened")
      coroutine.yield()
    end
    gate.waiting = gate.waiting - 1
  end
  return gate
end

--- Full garbage collections, enough for finalizers of finalized objects'
-- referents to run on every version.
function helpers.full_gc()
  for _ = 1, 4 do
    collectgarbage("collect")
  end
end

--- Runs a Lua source chunk (for syntax newer than 5.1), with the given
-- values as `...`.
function helpers.run_source(src, ...)
  local load = rawget(_G, "loadstring") or load
  return assert(load(src, "=" .. "source"))(...)
end

--- The command of the Lua that runs the specs: "lua5.4", "luajit", ...
function helpers.lua_command()
  if rawget(_G, "jit") then
    return "luajit"
  end
  return "lua" .. _VERSION:match("(%d+%.%d+)$")
end

--- Runs the Lua source `src` in a child process of the same Lua, with this
-- process's package.path and package.cpath (so from the same directory),
-- under a hang guard of `guard` seconds (default 60), so that a crash
-- fails a spec instead of ending the run. Returns what the child wrote
-- (stdout and stderr together) and its exit status: 128 + N when signal N
-- ended it, 124 when the hang guard did.
function helpers.run_child(src, guard)
  local script = os.tmpname()
  local f = assert(io.open(script, "w"))
  f:write(string.format("package.path = %q\npackage.cpath = %q\n",
                        package.path, package.cpath), src)
  f:close()
  local p = assert(io.popen(string.format("timeout %d %s %s 2>&1; echo \"rc=$?\"",
                                          guard or 60, helpers.lua_command(), script)))
  local out = p:read("*a")
  p:close()
  os.remove(script)
  local text, rc = out:match("^(.-)rc=(%d+)%s*$")
  return text or out, tonumber(rc)
end

--- How a child's exit status reads in a message.
function helpers.exit_text(rc)
  if rc == 124 then
    return "hung (killed by the hang guard)"
  elseif rc and rc > 128 then
    return "died of signal " .. (rc - 128)
  end
  return "exited with status " .. tostring(rc)
end

--- The collector's torture mode for this run ("" when off; see
-- gc_torture.lua).
helpers.gc_torture = require("gc_torture").mode()

--- n, or under GC torture a tenth of it (at least 1): for the count of a
-- loop that is there to repeat something many times, where each round
-- costs many collections under torture.
function helpers.scale(n)
  if helpers.gc_torture == "" then
    return n
  end
  return math.max(1, math.floor(n / 10))
end

helpers.unpack = unpack
helpers.lua51 = _VERSION == "Lua 5.1" and not rawget(_G, "jit")
helpers.lua54 = _VERSION == "Lua 5.4"
helpers.integers = math.type ~= nil

-- A leader in flight: a task of scheduler s running g:call(key, fn),
-- suspended inside fn until gate.open(). Returns the task and the gate.
function helpers.hold(s, g, key, result)
  local gate = helpers.gate()
  local task = s.go(function()
    return g:call(key, function()
      gate.wait()
      return result
    end)
  end)
  s.resume(task.co)
  return task, gate
end

return helpers
