describe("the module", function()
  local singleflight = require "singleflight"

  it("loads, with its C core", function()
    assert.is_table(singleflight)
    assert.is_function(singleflight.new)
    assert.is_function(singleflight.group)
    assert.is_function(singleflight.is_panic)
    assert.equal("singleflight: wait timed out", singleflight.TIMEOUT)
    assert.is_table(require "singleflight.core")
  end)

  it("the binding names its statuses in one table, which the Lua layer reads", function()
    local ST = require("singleflight.core").ST
    local names = { "LEADER", "DONE", "JOINED", "FOREIGN", "ABSENT", "RECURSIVE",
                    "PANICKED", "DELIVER", "DONE_GONE", "PANICKED_GONE" }
    local seen = {}
    for _, name in ipairs(names) do
      assert.is_number(ST[name], name)
      seen[ST[name]] = (seen[ST[name]] or 0) + 1
    end
    assert.equal(2, seen[ST.DONE]) -- LEADER of an acquire, DONE of a run
    -- no Lua file of the library writes a status as a number
    for _, file in ipairs { "flow", "flights", "liveness", "future", "runner", "shm" } do
      local f = assert(io.open("lua/singleflight/" .. file .. ".lua"))
      local text = f:read("*a")
      f:close()
      assert.is_nil(text:match("local DONE[%w_, ]*=%s*%d"), file)
      assert.is_nil(text:match("st [~=]= %d"), file)
    end
  end)

  it("runs a call", function()
    local g = singleflight.new()
    local v, err, shared = g:call("k", function(a, b) return a + b, "e" end, 1, 2)
    assert.equal(3, v)
    assert.equal("e", err)
    assert.is_false(shared)
  end)
end)
