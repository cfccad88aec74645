-- The codec option: how a leader's result crosses nginx workers (and
-- machines). The builtin codecs on their own, the option's checks at new,
-- and in a real nginx with four workers (ngx_shm_app.lua): a codec of the
-- application's own used both ways, panics that still cross as panics, a
-- failing codec that fails the other workers' callers only, and the
-- default, which keeps cycles and shared subtables.
local singleflight = require "singleflight"
local codec = require "singleflight.codec"

local has_buffer = pcall(require, "string.buffer")

describe("the builtin codecs", function()
  it("copy leaves every value to the core's copier", function()
    local c = assert(codec.check("copy"))
    assert.equal("copy", c.name)
    assert.is_nil(c.encode)
  end)

  it("buffer carries trees and leaves the rest to the copier",
     function()
    if not has_buffer then
      local c, why = codec.check("buffer")
      assert.is_nil(c)
      assert.equal("LuaJIT's string.buffer is not available here", why)
      assert.equal("copy", codec.default().name)
      return
    end
    local c = assert(codec.check("buffer"))
    assert.equal(c, codec.default())
    local tree = { name = "x", n = 0.1 + 0.2, list = { 1, 2, { 3 } }, [7] = false,
                   deep = { a = { b = "c" } } }
    local bytes = c.encode(tree, "second")
    assert.is_string(bytes)
    local v, err = c.decode(bytes)
    assert.same(tree, v)
    assert.equal("second", err)
    assert.equal(0.1 + 0.2, v.n)
    -- a result with no table: the copier moves it as fast
    for _, s in ipairs { "", string.rep("x", 10240), 42, true } do
      assert.is_nil(c.encode(s, "second"))
    end
    assert.same({ { 1 }, "e" }, { c.decode(c.encode({ 1 }, "e")) })
    assert.same({ "v", { e = 1 } }, { c.decode(c.encode("v", { e = 1 })) })
    local cycle = { 1 }
    cycle.me = cycle
    local sub = {}
    local deep = {}
    local at = deep
    for _ = 1, 150 do
      at.x = {}
      at = at.x
    end
    for what, value in pairs {
      cycle = cycle, shared = { sub, sub }, meta = setmetatable({}, {}),
      key_shared = { [sub] = sub }, fn = { print }, deep = deep,
      userdata = { io.stdout },
    } do
      assert.is_nil(c.encode(value, nil), what)
      assert.is_nil(c.encode("v", value), what .. " as err")
    end
    -- a decode of bytes it did not make raises
    assert.has_error(function() c.decode("not a buffer") end)
    assert.has_error(function() c.decode(bytes .. "x") end)
  end)
end)

describe("the codec option", function()
  local function codec_of(t)
    return { encode = function() return "" end, decode = function() end,
             extra = t }
  end
  -- { what, options, the message expected }
  local rows = {
    { "a number", { codec = 42 },
      [[bad option 'codec' to 'new' ("copy", "buffer" or a table expected, got number)]] },
    { "an unknown name", { codec = "json" },
      [[bad option 'codec' to 'new' ("copy", "buffer" or a table expected, got "json")]] },
    { "an unknown field", { codec = codec_of(1) },
      [[bad option 'codec' to 'new' (unknown field "extra")]] },
    { "no decode", { codec = { encode = tostring } },
      [[bad option 'codec' to 'new' (field 'decode': function expected, got nil)]] },
    { "an encode that is no function", { codec = { encode = "x", decode = tostring } },
      [[bad option 'codec' to 'new' (field 'encode': function expected, got string)]] },
    { "no shm", { codec = "copy" },
      [[bad option 'codec' to 'new' (needs shm beside it: values cross nginx workers and ]]
      .. [[machines only with shm)]] },
  }
  if not has_buffer then
    rows[#rows + 1] = { "buffer without string.buffer", { codec = "buffer" },
      [[bad option 'codec' to 'new' (LuaJIT's string.buffer is not available here)]] }
  end
  for _, row in ipairs(rows) do
    it("is checked at new: " .. row[1], function()
      local ok, e = pcall(singleflight.new, row[2])
      assert.is_false(ok)
      assert.matches(row[3], e, 1, true)
      -- and at group, which then opens nothing
      local before = singleflight._core.named()
      ok, e = pcall(singleflight.group, "codec-spec", row[2])
      assert.is_false(ok)
      assert.matches(row[3]:gsub("'new'", "'group'"), e, 1, true)
      assert.equal(before, singleflight._core.named())
    end)
  end
end)

local shm = require "shm_server"
local usable, why = shm.find()
if not usable then
  describe("codecs across nginx workers", function()
    pending("a real nginx (" .. why .. ")")
  end)
  return
end

local ns = shm.ns
local times, tally, distinct = shm.times, shm.tally, shm.distinct

describe("codecs across four nginx workers", function()
  local server, port

  setup(function()
    server, port = shm.start(4)
    shm.eventually(function() return #server.workers() == 4 end, "four workers")
  end)

  teardown(function()
    shm.stop_reporting(server)
  end)

  local function book(key)
    return tonumber(shm.book(port, key)) or 0
  end

  -- 40 requests on one key of the group `group`; the answers, split into
  -- the leader's worker's and the others'
  local function stampede(group, key, extra)
    local answers = ns.batch(port, times(40, "/shm/codec?group=" .. group .. "&key=" .. key
                                             .. "&n=40" .. (extra or "")), 30)
    local leader = shm.book(port, "leader:" .. group .. key)
    local here, there = {}, {}
    for _, a in ipairs(answers) do
      assert.equal(200, a.status) -- nothing hangs, nothing fails a request
      if a.fields.pid == leader then
        here[#here + 1] = a
      else
        there[#there + 1] = a
      end
    end
    assert.is_true(#here > 0 and #there > 0, "the connections reached one worker only")
    assert.equal(1, book("exec:" .. group .. key))
    return here, there, #distinct(answers, "pid")
  end

  it("a codec of the application's own carries the result both ways, once per worker",
     function()
    local here, there, workers = stampede("counted", "c1")
    for _, a in ipairs(here) do
      assert.equal("true", a.fields.ok)
      assert.equal("vc1", a.fields.name)
      assert.equal("false", a.fields.by_codec) -- the very value
    end
    for _, a in ipairs(there) do
      assert.equal("true", a.fields.ok)
      assert.equal("vc1", a.fields.name)
      assert.equal(string.format("%.17g", 0.1 + 0.2), a.fields.n)
      assert.equal("second", a.fields.err)
      assert.equal("true", a.fields.by_codec) -- its decode made it
    end
    -- encoded once, by the leader; decoded once in each other worker
    assert.equal(1, book("encoded:counted"))
    assert.equal(workers - 1, book("decoded:counted"))
    local st = shm.counters(port, "counted")
    assert.equal(workers - 1, st.waits)
    assert.equal(39, st.shared)
  end)

  it("a panic still crosses as a panic, by the copier, whatever the codec", function()
    local enc, dec = book("encoded:counted"), book("decoded:counted")
    local here, there = stampede("counted", "c2", "&kind=panic")
    for _, list in ipairs { here, there } do
      for _, a in ipairs(list) do
        assert.equal("false", a.fields.ok)
        assert.equal("true", a.fields.is_panic)
        assert.equal("42", a.fields.code)
      end
    end
    assert.equal(enc, book("encoded:counted"))
    assert.equal(dec, book("decoded:counted"))
  end)

  -- { group, what the others' error says }
  for _, row in ipairs {
    { "raise", "^%(the codec's encode failed: [^\n]*ngx_shm_app%.lua:%d+: no encoding today%)$" },
    { "garbage", "^%(the codec's encode failed: encode returned number, not a string%)$" },
    { "bad_decode", "^%(the codec's decode failed: table: 0x%x+%)$" },
  } do
    it("a codec that fails (" .. row[1] .. ") is an error naming the key in the other "
       .. "workers only", function()
      local key = row[1] .. "1"
      local here, there = stampede(row[1], key)
      for _, a in ipairs(here) do
        assert.equal("true", a.fields.ok)
        assert.equal("v" .. key, a.fields.name)
      end
      for _, a in ipairs(there) do
        assert.equal("false", a.fields.ok)
        assert.equal("false", a.fields.is_panic)
        local head = 'singleflight: result for key "' .. key .. '" cannot cross nginx workers '
        assert.equal(head, a.fields.message:sub(1, #head))
        assert.matches(row[2], a.fields.message:sub(#head + 1))
      end
      -- and the next call of the key runs afresh, nothing stuck
      assert.equal("true", ns.get(port, "/shm/codec?group=" .. row[1] .. "&key=" .. key)
                   .fields.ok)
      assert.equal(2, book("exec:" .. row[1] .. key))
    end)
  end

  -- every shape under the default, and under "copy" and "buffer" by name
  for _, group in ipairs { "default", "copy", "buffer" } do
    it("the " .. group .. " codec keeps trees, cycles and shared subtables, drops metatables",
       function()
      for _, shape in ipairs { "tree", "shared", "cycle", "meta" } do
        local answers = ns.batch(port, times(20, "/shm/codec?group=" .. group .. "&key="
                                                 .. shape .. "&n=20&shape=" .. shape), 30)
        assert.same({ ["true"] = 20 }, tally(answers, "ok"), shape)
        assert.same({ ["true"] = 20 }, tally(answers, "whole"), shape)
        assert.is_true(#distinct(answers, "pid") >= 2, "one worker only")
        assert.equal(1, book("exec:" .. group .. shape))
      end
    end)
  end
end)
