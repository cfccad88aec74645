--- singleflight.runner: the leader's step, the one place where the Lua
-- runtimes differ.
--
--   run(g, key, fn, ...)     acquire the key (a new call, counted); lead it
--                            (5.2 and later: on LuaJIT and 5.1, flow.lua's
--                            call acquires, and leads through lead below):
--   rerun(g, key, fn, ...)   the same for a waiter taking over (not counted)
--   lead(g, call, key, fn, ...)   lead a call acquired already (a future's)
--     -> DONE 0, v, err, shared | DELIVER 7, v, err, shared, call
--      | PANICKED 6, value, traceback, call|nil, key
--      | DONE_GONE 9, PANICKED_GONE 10: the same for a call that expired
--      | or acquire's status for a caller that does not lead (joined,
--        foreign, recursive: see csrc/lsf.c)
--     fn runs protected; its frame keeps the group's handle alive.
--   protect(fn, ...) -> true, ... | false, panic: fn run protected, on its
--     own (a caller that gave up waiting and runs fn unshared).
--   running() -> the coroutine the caller's scheduler resumes (on 5.1,
--     the one past the helper coroutines below).
--
-- Lua 5.2 and later run the leader in C (core.run: lua_pcallk, and on 5.4
-- the frame closes the coroutine's guard, so that coroutine.close abandons
-- a leader suspended in fn). LuaJIT and 5.1 run it here, over acquire and
-- finish; on 5.1, where a yield can't cross pcall, fn runs in a helper
-- coroutine whose yields are passed up to the caller's scheduler.

local core = require "singleflight.core"
local panic = require "singleflight.panic"

local rawget, setmetatable, xpcall = rawget, setmetatable, xpcall
local co_create, co_resume, co_running, co_status, co_yield =
      coroutine.create, coroutine.resume, coroutine.running, coroutine.status,
      coroutine.yield
local traceback = debug.traceback
local handler, is_panic = panic.handler, panic.is_panic
local acquire, finish = core.acquire, core.finish

local ST = core.ST
local DONE, PANICKED, DELIVER, DONE_GONE, PANICKED_GONE =
      ST.DONE, ST.PANICKED, ST.DELIVER, ST.DONE_GONE, ST.PANICKED_GONE

local M = {}
local LUA51 = _VERSION == "Lua 5.1" and not rawget(_G, "jit")

M.running = co_running

-- What the leader's protected fn gave, as the statuses of core.run.
local function settled(c, key, ok, v, err)
  if ok then
    local shared, nlocal, expired = finish(c, true, v, err)
    if expired then
      return DONE_GONE, v, err, shared, c
    elseif nlocal > 0 then
      return DELIVER, v, err, shared, c
    end
    return DONE, v, err, shared
  end
  panic.report(v, key) -- OpenResty: fn's error, once, to nginx's error log
  local value, tb = v, ""
  if is_panic(v) then -- the handler's; a bare value if it failed itself
    value, tb = v.value, v.traceback
  end
  local _, nlocal, expired = finish(c, false, value, tb)
  return expired and PANICKED_GONE or PANICKED, value, tb,
         (nlocal > 0 or expired) and c or nil, key
end

local protect
if not LUA51 then
  protect = function(_, fn, ...)
    return xpcall(fn, handler, ...)
  end
else
  -- helper -> the coroutine that runs it (false: the main one)
  local parent51 = setmetatable({}, { __mode = "kv" })
  local getinfo = debug.getinfo
  local alias, guard = core.alias, core.guard

  local getlocal = debug.getlocal
  local byte, dump, floor = string.byte, string.dump, math.floor
  local pairs, pcall, rawequal = pairs, pcall, rawequal

  --[[
  Lua 5.1 can't yield a coroutine while a call that the VM made from C is
  on its stack: a C function that called back into Lua (pcall, table.sort,
  string.gsub, a hook), but also a metamethod (__index, __add, __concat,
  __eq, ...) and the iterator of a for-in loop, which the VM calls without
  a C frame to show for it. Those are told apart from ordinary calls (tail
  calls and calls of unnamed expressions included) by where the callee
  sits in its caller's frame, which debug.getlocal shows up to there: up
  to the called register for OP_CALL; the loop's three hidden locals and
  no further for OP_TFORLOOP; the whole frame (the function's
  maxstacksize, read from its bytecode) and more for a metamethod, a hook
  or a finalizer.
  ]]

  -- function -> what its bytecode says: false for a C function; for a Lua
  -- function { ms = maxstacksize (nil: unknown), params = how many,
  -- loops = { [slots shown at one of its OP_TFORLOOPs] = true } or nil,
  -- calls = { [register an OP_CALL or OP_TAILCALL calls] = true } }
  local protos = setmetatable({}, { __mode = "k" })

  -- Reads the dump of Lua function f: its proto's header (after the
  -- chunk's: source, lines, upvalues, parameters, vararg flag) and code.
  local function read(f)
    local ok, s = pcall(dump, f)
    if not (ok and #s > 12 and s:sub(1, 5) == "\27Lua\81") then
      return {}
    end
    local little, sint, ssize, sinstr = byte(s, 7) == 1, byte(s, 8), byte(s, 9), byte(s, 10)
    local function uint(pos, size)
      local v = 0
      for i = 0, size - 1 do
        v = v * 256 + byte(s, little and pos + size - 1 - i or pos + i)
      end
      return v
    end
    local pos = 13
    pos = pos + ssize + uint(pos, ssize) + 2 * sint + 3
    local p = { ms = byte(s, pos), params = byte(s, pos - 2) }
    local n = uint(pos + 1, sint)
    pos = pos + 1 + sint
    local loops, calls
    for _ = 1, n do
      local i = byte(s, little and pos or pos + sinstr - 1) % 64
      if i == 28 or i == 29 or i == 33 then
        local a = floor(uint(pos, sinstr) / 64) % 256
        if i == 33 then
          loops = loops or {}
          loops[a + 3] = true
        else
          calls = calls or {}
          calls[a] = true
        end
      end
      pos = pos + sinstr
    end
    if loops then -- the calls matter where a loop might be, in stripped code
      p.loops, p.calls = loops, calls or {}
    end
    return p
  end

  local function proto(co, level, f)
    local p = protos[f]
    if p == nil then
      p = getinfo(co, level, "S").what ~= "C" and read(f)
      protos[f] = p
    end
    return p
  end

  -- Did the Lua frame at `level` of co, running f, call the one at
  -- `callee` from the VM rather than with OP_CALL?
  local function vm_called(co, level, p, callee)
    local ms = p.ms
    if ms == nil then
      return false
    elseif getlocal(co, level, ms) then
      return true -- past the frame's registers: metamethod, hook, finalizer
    end
    local loops = p.loops
    if loops == nil then
      return false
    end
    for n in pairs(loops) do
      if n <= ms and getlocal(co, level, n) and not getlocal(co, level, n + 1) then
        -- the callee's function sits where this loop's iterator goes
        local name, gen = getlocal(co, level, n - 2)
        if name == "(for generator)" then
          return true
        elseif name == "(*temporary)" and getinfo(co, level, "l").currentline <= 0 then
          -- stripped code, no local named: OP_CALL if there is none on
          -- that register; else the loop's, if it called its generator
          -- with its state
          if not p.calls[n] then
            return true
          end
          local ci = getinfo(co, callee, "f")
          if ci == nil or not rawequal(ci.func, gen) then
            return false
          end
          local cp = protos[gen]
          if not cp or (cp.params or 0) == 0 then
            return true
          end
          local _, state = getlocal(co, level, n - 1)
          local _, first = getlocal(co, callee, 1)
          return rawequal(first, state)
        end
        return false
      end
    end
    return false
  end

  -- True when co's stack holds a call that 5.1 can't yield across.
  local function c_boundary(co)
    -- getinfo and getlocal count the running coroutine's levels from the
    -- function that calls them: vm_called runs one level deeper
    local d = co == co_running() and 1 or 0
    local level, callee = 1, nil
    while true do
      local info = getinfo(co, level, "f")
      if info == nil then
        return false
      end
      local f = info.func
      if f ~= nil then -- nil: a tail call's lost frame
        local p = proto(co, level + d, f)
        if not p then
          return true
        elseif callee and vm_called(co, level + d, p, callee + d) then
          return true
        end
        callee = level
      end
      level = level + 1
    end
  end

  -- Can co (nil: the main coroutine) yield? Its helpers' parents must too.
  local function yieldable51(co)
    while co do
      if c_boundary(co) then
        return false
      end
      local parent = parent51[co]
      if parent == nil then
        return true
      end
      co = parent
    end
    return false
  end
  M.yieldable51 = yieldable51

  -- the panic of fn, in helper co: the value, where co stopped
  local function panic_in(co, value)
    local tb = traceback(co, "")
    if tb:sub(1, 1) == "\n" then
      tb = tb:sub(2)
    end
    return false, panic.new(value, tb)
  end

  -- fn in helper co is done: its results, or its panic
  local function finished(co, ok, ...)
    if ok then
      return true, ...
    end
    return panic_in(co, (...))
  end

  -- passes co's yields up, once the caller's coroutine was found able
  -- to (it stays so: its frames below this one don't change meanwhile)
  local function pass(co, ok, ...)
    if co_status(co) == "dead" then
      return finished(co, ok, ...)
    end
    return pass(co, co_resume(co, co_yield(...)))
  end

  -- fn's first yield: the call ends in a panic, fn left suspended, if the
  -- caller's coroutine can't pass it up
  local function step(co, ok, ...)
    if co_status(co) == "dead" then
      return finished(co, ok, ...)
    end
    local outer = co_running()
    local why
    if outer == nil then
      why = "attempt to yield from outside a coroutine"
    elseif not yieldable51(outer) then
      why = "attempt to yield across metamethod/C-call boundary"
    end
    if why then
      return panic_in(co, why)
    end
    return pass(co, co_resume(co, co_yield(...)))
  end

  -- coroutine.create takes only Lua functions; fn may be a C function or
  -- a callable value
  local function body(fn, ...)
    return fn(...)
  end

  -- gd: the guard whose calls fn runs for (its recursion is theirs)
  protect = function(gd, fn, ...)
    local co = co_create(body)
    if gd == true then
      gd = guard()
    end
    if gd then
      alias(co, gd)
    end
    parent51[co] = co_running() or false
    return step(co, co_resume(co, fn, ...))
  end

  M.running = function()
    local co = co_running()
    while co do
      local parent = parent51[co]
      if parent == nil then
        return co
      end
      co = parent or nil
    end
    return nil
  end
end

M.protect = function(fn, ...)
  return protect(nil, fn, ...)
end
M.settled = settled

if core.run then
  M.run, M.rerun = core.run, core.rerun
  M.lead = function(_, c, key, fn, ...)
    return core.lead(c, key, fn, ...)
  end
else
  -- Its frame is the leader's while fn runs: the sweep of flow.lua looks
  -- for such frames, holding the call among their locals
  -- (singleflight.liveness).
  local lead
  if LUA51 then
    lead = function(_, c, key, fn, ...)
      return settled(c, key, protect(true, fn, ...))
    end
  else
    lead = function(_, c, key, fn, ...)
      return settled(c, key, xpcall(fn, handler, ...))
    end
  end
  M.lead = lead
  local function runner(flags)
    return function(g, key, fn, ...)
      local st, c, gd, skey, opts = acquire(g, key, fn, "call", flags)
      if st ~= DONE then
        return st, c, gd, skey, opts
      end
      return lead(g, c, skey, fn, ...)
    end
  end
  -- (DEEPER: errors blame the caller of call, past this frame)
  M.rerun = runner(core.DEEPER) -- a new call: flow.lua's call acquires (enter)
end

return M
