--- singleflight.panic: the error every caller gets when the leader's fn
-- raised. It carries the raised value unchanged (`value`), the leader's
-- traceback where it raised (`traceback`) and the call's key (`key`).
--
-- In OpenResty the leader also reports fn's error to nginx's error log,
-- once per execution (report): ngx_lua logs an error that ends a request,
-- a light thread or a timer only if it is a string or a number (its
-- lua_isstring and lua_tostring, no __tostring), so an unhandled panic
-- would show as "runtime error: unknown reason".

local core = require "singleflight.core"

local getmetatable, pcall, rawget, setmetatable, tostring, type =
      getmetatable, pcall, rawget, setmetatable, tostring, type
local traceback = debug.traceback
local quote = core.quote

local Panic = { __name = "singleflight.Panic" }

local function is_panic(x)
  return type(x) == "table" and getmetatable(x) == Panic
end

-- tostring that never raises: a failing __tostring gives the type's name.
local function safe_tostring(v)
  local ok, s = pcall(tostring, v)
  if ok and type(s) == "string" then
    return s
  end
  return "(" .. type(v) .. " value, __tostring failed)"
end

local PREFIX = "singleflight: "

function Panic.__tostring(e)
  -- the innermost of panics raised again through nested calls, reached
  -- here rather than through each one's __tostring (a C call apiece,
  -- which runs PUC Lua out of C stack some 200 calls deep)
  local v = rawget(e, "value")
  while getmetatable(v) == Panic do
    v = rawget(v, "value")
  end
  local s = safe_tostring(v)
  -- a panic, or an error of this module, raised again by an fn that
  -- called the failed call: its text says singleflight once
  if s:sub(1, #PREFIX) == PREFIX then
    return s
  end
  return PREFIX .. s
end

local function new(value, tb, key)
  return setmetatable({ value = value, traceback = tb or "", key = key }, Panic)
end

-- OpenResty's log, where reports go (none elsewhere).
local ngx = rawget(_G, "ngx")
local ngx_log = type(ngx) == "table" and type(ngx.log) == "function" and ngx.log
local ERR = ngx_log and ngx.ERR

-- In OpenResty, the panics the message handler made of an fn's own error
-- (not of a panic raised again through fn) that nobody reported yet.
local unreported = setmetatable({}, { __mode = "k" })

-- The message handler of the leader's protected call: keeps the value
-- untouched and notes where it was raised.
local function handler(e)
  local tb = traceback("", 2)
  if type(tb) == "string" and tb:sub(1, 1) == "\n" then
    tb = tb:sub(2)
  end
  local p = new(e, tb)
  if ngx_log and not is_panic(e) then
    unreported[p] = true
  end
  return p
end

local function log_panic(p, key)
  ngx_log(ERR, "singleflight: fn raised for key ",
          type(key) == "string" and quote(key) or safe_tostring(key), ": ",
          safe_tostring(rawget(p, "value")), "\n", rawget(p, "traceback"))
end

-- The leader of `key` saw its protected fn fail with e (the handler's
-- panic, or a bare value when the handler itself failed). In OpenResty,
-- reports fn's own error, once, at the error level, with the traceback
-- where it was raised. A panic raised again through fn is reported if
-- nobody did yet (the shm tier's leader runs the user's fn inside the
-- fn of this worker's call), else not (a nested call's, reported when
-- that call finished); one that came from another worker or instance,
-- made by new, never is. Never raises: the leader has a call to finish.
local function report(e, key)
  if not ngx_log or not is_panic(e) then
    return
  end
  local inner = rawget(e, "value")
  if is_panic(inner) then -- raised again through fn: the panic it came from
    e = inner
  end
  if unreported[e] then
    unreported[e] = nil
    pcall(log_panic, e, key)
  end
end

-- What the leader's protected call gave on failure, as the panic of `key`
-- (reported as report says).
local function of(e, key)
  report(e, key)
  if not is_panic(e) then
    e = new(e)
  end
  e.key = key
  return e
end

return {
  Panic = Panic,
  is_panic = is_panic,
  new = new,
  of = of,
  handler = handler,
  report = report,
  safe_tostring = safe_tostring,
}
