--- The floor of an uncontended g:call on LuaJIT: what any call must do
-- that keeps its in-flight calls in the C core, reached through the FFI,
-- and tells the caller's coroutine from others (for recursion, and for
-- abandonment when the coroutine goes away): coroutine.running (a builtin
-- LuaJIT does not compile), the core's lead and finish, pcall(fn). No
-- argument checks, no panics, nobody waiting.

local core = require "singleflight.core"
local fast = require("singleflight.flow").fast
local ffi = require "ffi"

local pcall, setmetatable, tonumber = pcall, setmetatable, tonumber
local running = coroutine.running
local lead, finish, guards = fast.lead, fast.finish, fast.guards
local addr = ffi.new("uintptr_t[1]")

local Floor = {}
Floor.__index = Floor

function Floor:call(key, fn)
  local co = running()
  local gd = co and guards[co] or self.main
  if lead(self.g, key, #key, gd, 1, addr) ~= 0 then
    error("floor: the key was not led")
  end
  local c = tonumber(addr[0])
  local _, v = pcall(fn)
  finish(gd, c)
  return v
end

local M = {}

--- A floor for calls from the main thread and from coroutines that have
-- led a call of g:call before (so that they have their guard).
function M.new()
  local g = core.new()
  local st, c = core.enter(g, "warm-up", print) -- the main thread's guard
  assert(st == 0 and core.finish(c, true) == false)
  return setmetatable({ g = g, main = core.guard() }, Floor)
end

return M
