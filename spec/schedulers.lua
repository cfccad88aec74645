-- Schedulers for the backend specs, behind one small interface:
--
--   s.name, s.backend      the backend option to give singleflight
--   s.module               the backend table singleflight waits through
--   s.spawn(fn)            a new thread of the scheduler (from anywhere)
--   s.step()               one turn of the scheduler's loop (blocks ~10 ms
--                          at most when nothing is ready)
--   s.gate()               g:wait() blocks a thread until g:open(), which
--                          may be called from anywhere and never yields
--   s.errs                 errors raised by threads
--   s.auto                 true when backend "auto" should find it
--   s.polls_timeouts       true when a wait with a timeout comes back on
--                          every turn of the loop (copas 1.x has no timers)
--
-- Each constructor returns nil and a reason when the library is missing.
local M = {}

local LUA51 = _VERSION == "Lua 5.1" and not rawget(_G, "jit")
local unpack = table.unpack or unpack -- luacheck: ignore 143

--- pcall that lets f yield, on Lua 5.1 too.
function M.ypcall(f, ...)
  if not LUA51 then
    return pcall(f, ...)
  end
  local co = coroutine.create(f)
  local function step(ok, ...)
    if coroutine.status(co) == "dead" or not ok then
      return ok, ...
    end
    return step(coroutine.resume(co, coroutine.yield(...)))
  end
  return step(coroutine.resume(co, ...))
end

local function try_require(name)
  local ok, mod = pcall(require, name)
  if ok then
    return mod
  end
  return nil
end

function M.cqueues()
  local cqueues = try_require "cqueues"
  if not cqueues then
    return nil, "cqueues is not installed for " .. _VERSION
  end
  local condition = require "cqueues.condition"
  local cq = cqueues.new()
  local s = {
    name = "cqueues", backend = "cqueues", errs = {}, auto = true,
    module = require "singleflight.backend.cqueues",
  }
  function s.spawn(fn)
    cq:wrap(fn)
  end
  function s.step()
    local ok, err = cq:step(0.01)
    if not ok then
      s.errs[#s.errs + 1] = err
    end
  end
  function s.gate()
    local g = { opened = false, cond = condition.new() }
    function g.wait()
      while not g.opened do
        g.cond:wait()
      end
    end
    function g.open()
      g.opened = true
      g.cond:signal()
    end
    return g
  end
  return s
end

-- A gate for copas 1.x, which can only wake a thread through a socket.
local function socket_gate(copas)
  local socket = require "socket"
  local g = { opened = false, addrs = {} }
  function g.wait()
    local sock = assert(socket.udp())
    assert(sock:setsockname("127.0.0.1", 0))
    sock:settimeout(0)
    local ip, port = sock:getsockname()
    g.addrs[#g.addrs + 1] = { ip, port }
    while not g.opened do
      copas.receive(sock, 1)
    end
    sock:close()
  end
  function g.open()
    g.opened = true
    local out = assert(socket.udp())
    assert(out:setsockname("127.0.0.1", 0))
    for _, a in ipairs(g.addrs) do
      out:sendto("o", a[1], a[2])
    end
    out:close()
  end
  return g
end

-- A gate for copas 2 and later: pause until woken.
local function wakeup_gate(copas)
  local g = { opened = false, cos = {} }
  function g.wait()
    local sf = require "singleflight"
    local current = copas.current_thread or sf.running
    g.cos[#g.cos + 1] = current()
    while not g.opened do
      copas.pauseforever()
    end
  end
  function g.open()
    g.opened = true
    for _, co in ipairs(g.cos) do
      copas.wakeup(co)
    end
  end
  return g
end

local function copas_common(copas, s)
  function s.spawn(fn)
    copas.addthread(function(...)
      local set = copas.seterrorhandler or copas.setErrorHandler
      set(function(msg) s.errs[#s.errs + 1] = msg end)
      return fn(...)
    end)
  end
  function s.step()
    copas.step(0.01)
  end
  function s.gate()
    if copas.wakeup then
      return wakeup_gate(copas)
    end
    return socket_gate(copas)
  end
  return s
end

--- The copas installed for this Lua (Debian's is 1.x).
function M.copas()
  if not try_require "socket" then
    return nil, "luasocket is not installed for " .. _VERSION
  end
  local copas = try_require "copas"
  if not copas then
    return nil, "copas is not installed for " .. _VERSION
  end
  local module = require "singleflight.backend.copas"
  return copas_common(copas, {
    name = "copas (" .. tostring(copas._VERSION) .. ")", backend = "copas",
    errs = {}, auto = true, module = module,
    polls_timeouts = module.generation == "sockets",
  })
end

--- The backend loaded against a model of current copas.
function M.copas_model()
  if not try_require "socket" then
    return nil, "luasocket is not installed for " .. _VERSION
  end
  local model = require("copas_model").new()
  local loaded = package.loaded
  local saved_copas = loaded.copas
  local saved_backend = loaded["singleflight.backend.copas"]
  loaded.copas, loaded["singleflight.backend.copas"] = model, nil
  local ok, module = pcall(require, "singleflight.backend.copas")
  loaded.copas, loaded["singleflight.backend.copas"] = saved_copas, saved_backend
  assert(ok, module)
  -- a second copy of the module is not singleflight's own backend, which
  -- new takes as it is: it goes in as a backend table that inherits the
  -- interface (its field `generation` is no backend field)
  local s = copas_common(model, {
    name = "copas model", backend = setmetatable({}, { __index = module }), module = module,
    errs = {},
    auto = false, model = model,
  })
  local step = s.step
  function s.step()
    step()
    for _, e in ipairs(model.errors) do
      s.errs[#s.errs + 1] = e
    end
    model.errors = {}
  end
  return s
end

M.unpack = unpack

return M
