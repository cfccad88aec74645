--- singleflight: duplicate-call suppression for Lua.
--
-- While a call for a key is in flight, every other caller of that key waits
-- for it and gets the same result. The C module singleflight.core keeps the
-- in-flight calls; the Lua layer runs the callback (singleflight.flow),
-- makes duplicates wait through a scheduler (singleflight.backends) and
-- turns errors into panic errors (singleflight.panic).

-- "X.Y.Z" in a release, "X.Y.Z-dev" between releases (the next one's
-- number); tools/bump-version.sh sets it here and in csrc/lsf.h.
local VERSION = "0.3.1-dev"

local core = require "singleflight.core"
if core._VERSION ~= VERSION then
  error(string.format("singleflight: the C module singleflight.core is version %s "
                      .. "but the Lua module is version %s (a half-upgraded "
                      .. "install? reinstall singleflight)",
                      tostring(core._VERSION), VERSION), 2)
end

local panic = require "singleflight.panic"
local runner = require "singleflight.runner"
local options = require "singleflight.options"
local flow = require "singleflight.flow"
local future = require "singleflight.future"

local error, type = error, type
local sfmt = string.format
local opts_of = flow.opts_of

local M = {
  _VERSION = "singleflight " .. VERSION,
  TIMEOUT = flow.TIMEOUT,
  is_panic = panic.is_panic,
  --- The coroutine the caller's scheduler resumes (on Lua 5.1, singleflight
  -- runs fn in helper coroutines whose yields pass through this one).
  running = runner.running,
}

-- A group's methods that the Lua layer makes, put in by the binding's
-- one entry point for them
local interpose = core.interpose
interpose("methods", "call", flow.call)
interpose("methods", "do", flow.call)
interpose("methods", "stats", flow.stats)
interpose("methods", "start", future.start)
interpose("methods", "start_detached", future.start_detached)

-- With the shm option, g is a tiered group: its methods are those of the
-- nginx workers' tier (singleflight.shm, loaded on first use), which runs
-- the ordinary call of this state with the tier's step.
local function tier(g, o, name)
  if o.shm then
    require("singleflight.shm").attach(g, o, name)
  end
end

--- A group private to this Lua state.
function M.new(opts)
  local o = options.check("new", 1, opts)
  local g = core.new()
  opts_of[g] = o
  tier(g, o)
  return g
end

--- A handle on the process-wide group `name`.
function M.group(name, opts)
  if type(name) ~= "string" then
    error(sfmt("bad argument #1 to 'group' (string expected, got %s)", type(name)), 2)
  end
  local o = options.check("group", 2, opts)
  local g = core.open(name)
  opts_of[g] = o
  tier(g, o, name)
  return g
end

-- For the specs and the benchmarks.
M._core = core

return M
