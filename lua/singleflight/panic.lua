--- singleflight.panic: the error every caller gets when the leader's fn
-- raised. It carries the raised value unchanged (`value`), the leader's
-- traceback where it raised (`traceback`) and the call's key (`key`).

local getmetatable, pcall, rawget, setmetatable, tostring, type =
      getmetatable, pcall, rawget, setmetatable, tostring, type
local traceback = debug.traceback

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
  local s = safe_tostring(rawget(e, "value"))
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

-- The message handler of the leader's protected call: keeps the value
-- untouched and notes where it was raised.
local function handler(e)
  local tb = traceback("", 2)
  if type(tb) == "string" and tb:sub(1, 1) == "\n" then
    tb = tb:sub(2)
  end
  return new(e, tb)
end

-- What the leader's protected call gave on failure, as the panic of `key`:
-- the handler's panic, or a bare value when the handler itself failed.
local function of(e, key)
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
  safe_tostring = safe_tostring,
}
