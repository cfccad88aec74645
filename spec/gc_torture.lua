-- The garbage collector at its most aggressive, for the spec suite's
-- torture run (`make gc-torture`): every allocation check runs a step of
-- the collector, and a whole cycle ends every few dozen allocations, so
-- that finalizers run, and unreachable objects are freed, at any point
-- where Lua or the C module allocates.
--
-- Used three ways, all keyed on SINGLEFLIGHT_GC_TORTURE:
--   LUA_INIT=@spec/gc_torture.lua    every interpreter of the run (busted,
--                                    and the child processes of specs)
--                                    applies it before anything else
--   require("gc_torture").apply(m)   nginx's Lua (nginx_server.lua)
--   ctest/sfthreads.c                each state it makes in an OS thread
--                                    (the same settings, in C)
--
-- SINGLEFLIGHT_GC_TORTURE:
--   unset, "" or "0"  nothing changes
--   "full"            a whole cycle at every allocation check (slow: for
--                     one spec file at a time). LuaJIT runs with its JIT
--                     off then: a trace can't run the atomic phase, so a
--                     trace whose entry check must finish a cycle exits,
--                     the cycle ends outside it, and the trace is entered
--                     again with the next cycle due: for ever.
--   anything else     pause 0 (a cycle starts as soon as one ends) and
--                     each step as large as the VM keeps it without that
--                     livelock:
--                     5.4: incremental mode, a step every 2 bytes
--                       allocated, step multiplier 1020 (its largest: the
--                       parameter is stored over 4 in a byte): a cycle
--                       every ~25 small allocations on a 2 MB heap
--                     LuaJIT: step multiplier 300 (3 KB of work a step,
--                       a step at every check while the collector owes
--                       work, which with pause 0 is always): a cycle every
--                       ~700 allocations on a 2 MB heap. At 800 a 40 KB
--                       state looping over pcall(error) livelocks as above.
--                     5.1 to 5.3: step multiplier 1000
local M = {}

local jit = rawget(_G, "jit")

--- The mode in force for this process ("" when off).
function M.mode()
  local m = os.getenv("SINGLEFLIGHT_GC_TORTURE") or ""
  return m == "0" and "" or m
end

--- Applies mode (see above) to this Lua state.
function M.apply(mode)
  if mode == nil or mode == "" or mode == "0" then
    return
  end
  local full = mode == "full"
  if _VERSION == "Lua 5.4" then
    -- 5.4's interpreter starts generational; pause 0 means "unchanged" to
    -- "incremental", hence setpause. A step size of 2^100 bytes: no limit.
    collectgarbage("incremental", 0, 0, full and 100 or 1)
    collectgarbage("setpause", 0)
    collectgarbage("setstepmul", 1023)
  else
    collectgarbage("setpause", 0)
    if full then
      collectgarbage("setstepmul", jit and 0 or 1000000000) -- 0: no limit
      if jit then
        jit.off()
      end
    else
      collectgarbage("setstepmul", jit and 300 or 1000)
    end
  end
end

-- Run as a file (LUA_INIT, dofile) rather than required: apply the mode
-- of the environment.
if select("#", ...) == 0 then
  M.apply(M.mode())
end

return M
