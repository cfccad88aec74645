--- singleflight backend "copas": duplicates wait inside copas threads.
--
-- Two generations of copas are told apart by what they offer:
--
-- * copas 2 and later (copas.wakeup with copas.pauseforever, or
--   copas.sleep(-1)): a waiter pauses, the leader wakes it with
--   copas.wakeup; a timeout is a pause with a limit.
-- * older copas (1.x, as packaged by Debian) has neither timers nor
--   wakeup: its loop resumes a thread only when a socket is ready. A
--   waiter reads from a loopback UDP socket of its own and the leader
--   sends it a datagram, so it is woken on the next step of the loop. A
--   waiter with a timeout can't be woken by a timer there: it comes back
--   on every step of the loop to check its deadline (parked on copas' own
--   read set with a socket that is always ready), which keeps the loop
--   busy while it waits.
--
-- g:start spawns the leader with copas.addthread.

local copas = require "copas"

local error, pairs, tostring, type = error, pairs, tostring, type
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
-- coroutines, and copas knows only the thread they yield through.
local function thread()
  local sf = package.loaded.singleflight
  if type(sf) == "table" and type(sf._running) == "function" then
    return sf._running()
  end
  return co_running()
end

--- The waiters of one in-flight call: coroutine -> how to wake it.
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

  local function new_socket()
    local s, err = socket.udp()
    if s then
      s:settimeout(0)
      local ok
      ok, err = s:setsockname("127.0.0.1", 0)
      if ok then
        return s
      end
      s:close()
    end
    error("singleflight: copas backend: no loopback UDP socket: " .. tostring(err), 0)
  end

  -- The set copas parks readers on, found once by letting a throwaway
  -- coroutine block in copas.receive: copas 1.x hands every reader to its
  -- loop as (socket, set).
  local read_set
  local function find_read_set()
    if read_set == nil then
      read_set = false
      local s = new_socket()
      local ok, skt, set = co_resume(co_create(copas.receive), s, 1)
      s:close()
      if ok and skt == s and type(set) == "table"
         and type(set.insert) == "function" and type(set.push) == "function" then
        read_set = set
      end
    end
    return read_set
  end

  local sender

  function backend.wait(waiting, secs)
    -- a socket per wait: copas 1.x closes the socket that last woke a
    -- thread when the thread ends, so none can be kept for later
    local s = new_socket()
    if secs then
      -- back on the next step of the loop: a datagram to ourselves makes
      -- the socket ready at once
      local set = find_read_set()
      if not set then
        s:close()
        error("singleflight: this copas has no timers; a timeout needs copas 2 "
              .. "or later", 0)
      end
      s:sendto("t", s:getsockname())
      co_yield(s, set)
    else
      local co, ip, port = thread(), s:getsockname()
      waiting[co] = { ip = ip, port = port }
      local ok, err = copas.receive(s, 1)
      waiting[co] = nil
      if not ok then
        s:close()
        error("singleflight: copas backend: waiting socket failed: " .. tostring(err), 0)
      end
    end
    s:close()
  end

  function backend.wake(waiting, n)
    sender = sender or new_socket()
    for co, addr in pairs(waiting) do
      if n <= 0 then
        break
      end
      waiting[co] = nil
      sender:sendto("w", addr.ip, addr.port)
      n = n - 1
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

--- Runs fn(...) in a new copas thread.
function backend.spawn(fn, ...)
  copas.addthread(fn, ...)
end

return backend
