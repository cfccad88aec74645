--- The codecs a result crosses nginx workers and machines by (the codec
-- option of groups with shm): bytes, and ns per round trip (encode, then
-- decode), for a few shapes of value.
--
--   lua bench/codec_bench.lua [SCALE]
--
-- Prints "codec_<shape>_<codec>_ns N" and "codec_<shape>_<codec>_bytes N"
-- lines. Codecs: copy (the core's copier), buffer (the builtin: LuaJIT's
-- string.buffer for trees, the copier for the rest), raw (string.buffer
-- alone, which keeps no shared subtable and refuses cycles: for reference).
-- Shapes: small (a table of 6 fields, one a list), string (10 KB), nested
-- (100 tables of 10 tables of 2 fields: 1000 entries), cycle (small, with a
-- field that is the table itself).
local codec = require "singleflight.codec"
local core = require "singleflight.core"

local scale = tonumber(arg[1]) or 1
local now = core.now
local fmt = string.format

local function small()
  return { id = 42, name = "alice", email = "alice@example.com", tags = { "a", "b", "c" },
           active = true, score = 3.5 }
end

local nested = {}
for i = 1, 100 do
  local t = {}
  for j = 1, 10 do
    t[j] = { i = i, j = j }
  end
  nested[i] = t
end
local cycle = small()
cycle.me = cycle

local shapes = {
  { "small", small(), 200000 },
  { "string", string.rep("x", 10240), 100000 },
  { "nested", nested, 2000 },
  { "cycle", cycle, 200000 },
}

local encode, decode = core.encode, core.decode
local codecs = {
  { "copy", function(v, err)
      return encode(true, v, err)
    end, function(s)
      local _, v, err = decode(s)
      return v, err
    end },
}
local builtin = codec.check("buffer")
if builtin then
  -- as the tier does: the builtin's bytes, or (nil) the copier's, told
  -- apart by a flag kept beside them
  codecs[#codecs + 1] = { "buffer", function(v, err)
    local bytes = builtin.encode(v, err)
    if bytes then
      return bytes, true
    end
    return encode(true, v, err), false
  end, function(s, by_buffer)
    if by_buffer then
      return builtin.decode(s)
    end
    local _, v, err = decode(s)
    return v, err
  end }
  local buffer = require "string.buffer"
  local buf = buffer.new()
  codecs[#codecs + 1] = { "raw", function(v, err)
    buf:reset()
    buf:encode(v)
    buf:encode(err)
    return buf:tostring()
  end, function(s)
    buf:set(s)
    return buf:decode(), buf:decode()
  end }
end

for _, shape in ipairs(shapes) do
  local name, v, n = shape[1], shape[2], math.max(1, math.floor(shape[3] * scale))
  for _, c in ipairs(codecs) do
    local cname, enc, dec = c[1], c[2], c[3]
    local fine, bytes = pcall(enc, v, "second")
    if fine then
      for _ = 1, n / 10 + 1 do -- warm up
        dec(enc(v, "second"))
      end
      local t0 = now()
      for _ = 1, n do
        dec(enc(v, "second"))
      end
      assert(select(2, dec(enc(v, "second"))) == "second")
      local t = now() - t0
      print(fmt("codec_%s_%s_ns %.1f", name, cname, t / n * 1e9))
      print(fmt("codec_%s_%s_bytes %d", name, cname, #bytes))
    end
  end
end
