--- singleflight backend "copas": duplicates wait inside copas threads.
--
-- Two generations of copas are told apart by what they offer:
--
-- * copas 2 and later (copas.wakeup with copas.pauseforever, or
--   copas.sleep(-1)): a waiter pauses, the leader wakes it with
--   copas.wakeup; a timeout is a pause with a limit.
-- * older copas (1.x, as packaged by Debian) has neither timers nor
--   wakeup: its loop resumes a thread only when what the thread yielded
--   to its read set is ready, as LuaSocket's select tells. A waiter parks
--   there with a ticket of its own: a plain table that select takes for a
--   socket, answering getfd with the descriptor of one loopback UDP
--   socket that the backend shares among all its waiters (the doorbell),
--   and dirty (ready without reading, as select asks of buffered sockets)
--   once the leader has rung it. Waiting costs no descriptor per waiter:
--   one for the whole state. The leader also sends the doorbell a
--   datagram, so that a loop already blocked in select (a wake from a
--   finalizer run inside it) returns at once; the waiter that comes back
--   drains it. A waiter with a timeout can't be woken by a timer there:
--   its ticket is always ready, so it comes back on every step of the
--   loop to check its deadline, which keeps the loop busy while it waits.
--
-- wake runs from __gc finalizers too, down to those lua_close runs: it
-- creates nothing, and once the state closes it no longer calls LuaSocket,
-- whose C library may be unloaded by then.
--
-- g:start spawns the leader with copas.addthread.

local copas = require "copas"

local error, pairs, select, tostring, type = error, pairs, select, tostring, type
local unpack = table.unpack or unpack -- luacheck: ignore 143
local package = package
local co_running, co_yield, co_create, co_resume =
      coroutine.running, coroutine.yield, coroutine.create, coroutine.resume
local co_isyieldable = coroutine.isyieldable

local backend = { name = "copas" }

local wakeup = copas.wakeup
local pause = copas.pause or copas.sleep
local pauseforever = copas.pauseforever
if not pauseforever and copas.sleep and wakeup then
  pauseforever = function() copas.sleep(-1) end
end

backend.generation = (wakeup and pause and pauseforever) and "wakeup" or "sockets"

-- The coroutine copas resumes: on Lua 5.1 singleflight runs fn in helper
-- coroutines, and copas knows only the thread they yield through
-- (singleflight.running, public).
local function thread()
  local sf = package.loaded.singleflight
  if type(sf) == "table" and type(sf.running) == "function" then
    return sf.running()
  end
  return co_running()
end

--- The waiters of one in-flight call: copas 2 and later, coroutine ->
-- true; copas 1.x, ticket -> true.
function backend.new()
  return {}
end

if backend.generation == "wakeup" then

  function backend.wait(waiting, secs)
    local co = thread()
    waiting[co] = true
    if secs then
      pause(secs)
    else
      pauseforever()
    end
    waiting[co] = nil
  end

  function backend.wake(waiting, n)
    for co in pairs(waiting) do
      if n <= 0 then
        break
      end
      waiting[co] = nil
      wakeup(co)
      n = n - 1
    end
  end

else

  local socket = require "socket"

  local newproxy = rawget(_G, "newproxy")
  local getmetatable, setmetatable = getmetatable, setmetatable

  -- The doorbell: its socket, address and descriptor, opened by the first
  -- wait and kept for the life of the state. closing is set when the state
  -- closes, by a finalizer created after LuaSocket was loaded: finalizers
  -- run newest first there, so it runs before LuaSocket is unloaded.
  local bell = { closing = false }
  do
    local function on_close()
      bell.closing = true
    end
    if newproxy then -- Lua 5.1 and LuaJIT: no __gc for tables
      bell.sentinel = newproxy(true)
      getmetatable(bell.sentinel).__gc = on_close
    else
      bell.sentinel = setmetatable({}, { __gc = on_close })
    end
  end

  local function open_doorbell()
    local s, err = socket.udp()
    if s then
      s:settimeout(0)
      local ok
      ok, err = s:setsockname("127.0.0.1", 0)
      if ok then
        local ip, port = s:getsockname()
        bell.fd, bell.ip, bell.port = s:getfd(), ip, port
        bell.socket = s
        return s
      end
      s:close()
    end
    error("singleflight: copas backend: no loopback UDP socket: " .. tostring(err), 0)
  end

  -- Reads what was sent to the doorbell, so that it is not ready again.
  local function drain()
    local s = bell.socket
    for _ = 1, 64 do
      if not s:receive() then
        return
      end
    end
  end

  -- What a waiter parks on copas' read set. copas closes what last
  -- resumed a thread when the thread ends: a ticket's close does nothing.
  local ticket_mt = { __index = {
    getfd = function() return bell.fd end,
    dirty = function(self) return self.rung end,
    close = function() end,
  } }

  -- The set copas parks readers on, found once by letting a throwaway
  -- coroutine block in copas.receive on a stand-in socket: copas 1.x
  -- hands every reader to its loop as (socket, set).
  local read_set
  local function find_read_set()
    if read_set == nil then
      read_set = false
      local calls = 0
      local stand_in = { receive = function()
        calls = calls + 1
        if calls == 1 then
          return nil, "timeout"
        end
        return nil, "closed"
      end }
      local co = co_create(copas.receive)
      local ok, skt, set = co_resume(co, stand_in, 1)
      if ok and skt == stand_in and type(set) == "table"
         and type(set.insert) == "function" and type(set.push) == "function" then
        read_set = set
      end
      -- copas.receive returns, and forgets the stand-in
      co_resume(co)
    end
    return read_set
  end

  function backend.wait(waiting, secs)
    local set = read_set or find_read_set()
    if not set then
      error("singleflight: copas backend: this copas has neither copas.wakeup nor "
            .. "copas 1.x's read set", 0)
    end
    if not bell.socket then
      open_doorbell()
    end
    -- made here, with what wake will change in it: wake creates nothing
    local ticket = setmetatable({ rung = false }, ticket_mt)
    if secs then
      -- back on the next step of the loop
      ticket.rung = true
    else
      waiting[ticket] = true
    end
    repeat
      co_yield(ticket, set)
      drain()
    until ticket.rung
  end

  function backend.wake(waiting, n)
    local rung = false
    for ticket in pairs(waiting) do
      if n <= 0 then
        break
      end
      waiting[ticket] = nil
      ticket.rung = true
      rung = true
      n = n - 1
    end
    if rung and not bell.closing then
      -- a closed socket only answers "closed"
      bell.socket:sendto("w", bell.ip, bell.port)
    end
  end

end

--- True in a coroutine that can yield, while copas' loop runs (copas 2
-- and later say so in copas.running; copas 1.x can't tell).
function backend.can_wait()
  local co, main = co_running()
  if co == nil or main then
    return false, "the main coroutine cannot wait (run the caller in a copas "
                  .. "thread: copas.addthread)"
  end
  if co_isyieldable and not co_isyieldable() then
    return false, "the running coroutine cannot yield here"
  end
  if copas.running == false then
    return false, "the copas loop is not running (copas.loop() sets copas.running; "
                  .. "set it yourself if you call copas.step)"
  end
  return true
end

--- Runs fn(...) in a new copas thread. (copas 1.x hands a thread's
-- function an extra nil first; the arguments travel in a closure.)
function backend.spawn(fn, ...)
  local n, args = select("#", ...), { ... }
  copas.addthread(function()
    return fn(unpack(args, 1, n))
  end)
end

return backend
