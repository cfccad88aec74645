-- singleflight.liveness: the one stack walker of OpenResty's liveness. A
-- lead counts while a frame of its function holds its record among its
-- locals; what the local is called, and where it sits, does not matter.
local frames = require "singleflight.liveness"

describe("liveness.holds", function()
  local seen
  local lead_set = {}
  -- a leader frame: the record is its third local, under a name of its own
  local function lead(before, rec, after_) -- luacheck: ignore 212
    local scratch = { before, after_ }
    seen = frames.holds(coroutine.running(), lead_set, rec)
    coroutine.yield(scratch)
    return "done"
  end
  lead_set[lead] = true

  it("finds a suspended leader's frame by the record it holds", function()
    local rec, other = {}, {}
    local co = coroutine.create(function() return lead(1, rec, 2) end)
    assert.is_true(coroutine.resume(co))
    assert.is_true(frames.holds(co, lead_set, rec))
    assert.is_false(frames.holds(co, lead_set, other))
    assert.is_false(frames.holds(co, {}, rec)) -- not a leader frame
    assert.is_true(frames.holds(co, lead_set, other, rec)) -- the alternative
    assert.is_true(coroutine.resume(co))
    assert.equal("dead", coroutine.status(co))
    assert.is_false(frames.holds(co, lead_set, rec)) -- returned: gone
  end)

  it("finds the running coroutine's own leader frame", function()
    local rec = {}
    local co = coroutine.create(function() return lead("x", rec, "y") end)
    assert.is_true(coroutine.resume(co))
    assert.is_true(seen)
    seen = nil
    -- the same frame, asked for another record
    co = coroutine.create(function() return lead("x", {}, "y") end)
    assert.is_true(coroutine.resume(co))
    assert.is_false(frames.holds(co, lead_set, rec))
    assert.is_true(seen) -- (its own)
  end)

  it("looks past frames that are not leaders', however deep", function()
    local rec = {}
    local function deep(n)
      if n == 0 then
        return lead(nil, rec, nil)
      end
      local r = deep(n - 1)
      return r
    end
    local co = coroutine.create(function() return deep(50) end)
    assert.is_true(coroutine.resume(co))
    assert.is_true(frames.holds(co, lead_set, rec))
  end)
end)
