-- A small model of current copas (3.x/4.x), for the specs: the part of its
-- documented API the copas backend relies on (addthread, pause,
-- pauseforever, wakeup, seterrorhandler, running), driven by step().
-- Current copas can't be installed here; this checks that the backend's
-- code path for it keeps to that API. Timers use the real clock.
local socket = require "socket"

local gettime, sleep = socket.gettime, socket.sleep
local co_create, co_resume, co_running, co_status, co_yield =
      coroutine.create, coroutine.resume, coroutine.running, coroutine.status,
      coroutine.yield
local unpack = table.unpack or unpack -- luacheck: ignore 143

local PARKED = {} -- what a thread yields when it pauses through the model

local function new()
  local copas = { _VERSION = "copas model", running = false }
  local ready = {}      -- { co, args }
  local sleeping = {}   -- co -> wake time (math.huge: until woken)
  local handlers = {}   -- co -> error handler
  copas.errors = {}     -- errors of threads that had no handler
  copas.stray = 0       -- yields that did not come from the model's API

  function copas.addthread(fn, ...)
    local co = co_create(fn)
    ready[#ready + 1] = { co, { n = select("#", ...), ... } }
    return co
  end

  -- As copas does, a pause parks the thread the loop resumed, whatever
  -- coroutine (nested in it) the pause was called from.
  local current

  -- Not copas API: the thread the loop resumed, for the specs' gates.
  function copas.current_thread()
    return current
  end

  function copas.pause(secs)
    sleeping[current or co_running()] = gettime() + ((secs and secs > 0) and secs or 0)
    co_yield(PARKED)
  end

  function copas.pauseforever()
    sleeping[current or co_running()] = math.huge
    co_yield(PARKED)
  end

  function copas.wakeup(co)
    if sleeping[co] then
      sleeping[co] = nil
      ready[#ready + 1] = { co }
      return true
    end
    return nil, "not sleeping"
  end

  function copas.seterrorhandler(fn)
    handlers[current or co_running()] = fn
  end

  function copas.finished()
    return #ready == 0 and next(sleeping) == nil
  end

  local function run(co, args)
    local ok, what
    current = co
    if args then
      ok, what = co_resume(co, unpack(args, 1, args.n))
    else
      ok, what = co_resume(co)
    end
    current = nil
    if not ok then
      local h = handlers[co]
      if h then
        h(what, co)
      else
        copas.errors[#copas.errors + 1] = what
      end
    elseif co_status(co) == "suspended" and what ~= PARKED then
      copas.stray = copas.stray + 1
    end
    if co_status(co) == "dead" then
      handlers[co] = nil
    end
  end

  --- One turn: wakes the sleepers that are due (waiting up to `timeout`
  -- seconds for the first of them when nothing is ready), then resumes
  -- every thread that was ready.
  function copas.step(timeout)
    copas.running = true
    if #ready == 0 then
      local first = math.huge
      for _, at in pairs(sleeping) do
        if at < first then
          first = at
        end
      end
      local pause = math.min(first - gettime(), timeout or 0)
      if pause > 0 then
        sleep(pause)
      end
    end
    local t = gettime()
    for co, at in pairs(sleeping) do
      if at <= t then
        sleeping[co] = nil
        ready[#ready + 1] = { co }
      end
    end
    local batch = ready
    ready = {}
    for i = 1, #batch do
      run(batch[i][1], batch[i][2])
    end
    return #batch > 0
  end

  return copas
end

return { new = new }
