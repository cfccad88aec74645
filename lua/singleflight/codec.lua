--- singleflight.codec: how a leader's result crosses nginx workers and
-- machines (the codec option of groups with shm, and so redis).
--
-- A codec is { name, encode = function(v, err) -> bytes, decode =
-- function(bytes) -> v, err }. The tier (singleflight.shm) calls encode
-- once per execution that has waiters elsewhere, and decode once per
-- worker that waited, each under pcall: a codec that raises, or an encode
-- that gives something else than a string, fails the callers of the other
-- workers only. A builtin's encode may also give nil: that value crosses
-- by the core's copier instead (the tier tells the two apart). A panic
-- always crosses by the copier, whatever the codec.
--
--   "copy"    the core's copier (csrc/lsf_copy.c), for every value that
--             can cross: cycles and shared subtables kept.
--   "buffer"  LuaJIT's string.buffer, for the tables it keeps whole: trees
--             of nil, booleans, numbers and strings, with no table met
--             twice and no metatable, at most BUFFER_DEPTH deep. Anything
--             else (a cycle, a shared subtable, a metatable, a light
--             userdata, a value that cannot cross, and a result with no
--             table at all, which the copier moves as fast) goes to the
--             copier, so what crosses, and how, is the copier's. The
--             default where string.buffer is there (measured:
--             bench/codec_bench.lua).

local error, getmetatable, ipairs, next, pairs, pcall, require, type =
      error, getmetatable, ipairs, next, pairs, pcall, require, type
local sfmt = string.format

-- empties a table, keeping its room (LuaJIT's table.clear where it is)
local clear = (function()
  local ok, f = pcall(require, "table.clear")
  if ok and type(f) == "function" then
    return f
  end
  return function(t)
    for k in pairs(t) do
      t[k] = nil
    end
  end
end)()

local M = {}

local FIELDS = { encode = true, decode = true }

-- string.buffer refuses deeper tables; the copier goes to 200
local BUFFER_DEPTH = 90

local COPY = { name = "copy" } -- no encode: the tier uses the copier itself

local buffer_codec -- made once, where string.buffer loads

-- Kinds of value string.buffer keeps as the copier would.
local PLAIN = { number = true, string = true, boolean = true }

local seen -- the tables met so far in one check (reused; emptied after)

local tree

-- Is x (a key or a value in a table depth deep) plain, or a tree met first?
local function fits(x, depth)
  local tx = type(x)
  if tx ~= "table" then
    return PLAIN[tx] == true
  elseif seen[x] then
    return false
  end
  seen[x] = true
  return tree(x, depth + 1)
end

-- Is t a tree of plain values, no table met twice, no metatable?
function tree(t, depth)
  if depth > BUFFER_DEPTH or getmetatable(t) ~= nil then
    return false
  end
  for k, v in next, t do
    if not (fits(k, depth) and fits(v, depth)) then
      return false
    end
  end
  return true
end

local function whole(v)
  local tv = type(v)
  if tv ~= "table" then
    return v == nil or PLAIN[tv] == true
  end
  seen[v] = true
  local ok = tree(v, 1)
  clear(seen)
  return ok
end

local function make_buffer()
  local ok, buffer = pcall(require, "string.buffer")
  if not ok or type(buffer) ~= "table" or type(buffer.new) ~= "function" then
    return nil
  end
  seen = {}
  local buf = buffer.new()
  return {
    name = "buffer",
    encode = function(v, err)
      if type(v) ~= "table" and type(err) ~= "table" then
        return nil -- no table: the copier is as quick (measured)
      elseif not (whole(v) and whole(err)) then
        return nil -- the copier keeps what string.buffer would not
      end
      buf:reset()
      buf:encode(v)
      buf:encode(err)
      return buf:tostring()
    end,
    decode = function(bytes)
      buf:set(bytes)
      local v = buf:decode()
      local err = buf:decode()
      if #buf ~= 0 then
        error("trailing bytes", 0)
      end
      buf:reset()
      return v, err
    end,
  }
end

--- The codec named `name`, or nil and why not.
local function builtin(name)
  if name == "copy" then
    return COPY
  elseif name == "buffer" then
    if buffer_codec == nil then
      buffer_codec = make_buffer() or false
    end
    if not buffer_codec then
      return nil, "LuaJIT's string.buffer is not available here"
    end
    return buffer_codec
  end
  return nil, sfmt("\"copy\", \"buffer\" or a table expected, got %q", name)
end

--- The default: "buffer" where string.buffer is there, else "copy".
function M.default()
  return builtin("buffer") or COPY
end

--- The codec the option's value `v` names, or nil and what is wrong with it.
function M.check(v)
  if type(v) == "string" then
    return builtin(v)
  elseif type(v) ~= "table" then
    return nil, "\"copy\", \"buffer\" or a table expected, got " .. type(v)
  end
  for k in pairs(v) do
    if not FIELDS[k] then
      return nil, sfmt("unknown field %s", type(k) == "string" and sfmt("%q", k)
                                          or type(k))
    end
  end
  for _, k in ipairs { "encode", "decode" } do
    if type(v[k]) ~= "function" then
      return nil, sfmt("field '%s': function expected, got %s", k, type(v[k]))
    end
  end
  local enc, dec = v.encode, v.decode
  return {
    name = "custom",
    encode = function(value, err)
      local bytes = enc(value, err)
      if type(bytes) ~= "string" then
        error(sfmt("encode returned %s, not a string", type(bytes)), 0)
      end
      return bytes
    end,
    decode = dec,
  }
end

M.COPY = COPY

return M
