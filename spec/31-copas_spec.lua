-- The copas backend under the copas installed for this Lua (Debian's is
-- copas 1.x, with neither timers nor wakeup), and under a model of the API
-- of current copas (pause, pauseforever, wakeup).
local schedulers = require "schedulers"
local suite = require "scheduler_suite"

local function run_suite(make)
  local probe, missing = make()
  for _, c in ipairs(suite.cases) do
    local why = missing or (c.needs and c.needs(probe))
    if why then
      pending(c.name .. " (" .. why .. ")")
    else
      it(c.name, function() c.fn(make) end)
    end
  end
end

describe("backend copas, installed", function()
  run_suite(schedulers.copas)
end)

describe("backend copas, current copas's API", function()
  run_suite(schedulers.copas_model)

  it("never yields to the model but through its API", function()
    local s = assert(schedulers.copas_model())
    assert.equal("wakeup", s.module.generation)
    local singleflight = require "singleflight"
    local g = singleflight.new { backend = s.backend, timeout = 5 }
    local gate = s.gate()
    local n = 0
    for _ = 1, 5 do
      s.spawn(function()
        g:call("api", function() gate.wait() return 1 end)
        n = n + 1
      end)
    end
    for _ = 1, 20 do s.step() end
    gate.open()
    for _ = 1, 20 do
      if n == 5 then break end
      s.step()
    end
    assert.equal(5, n)
    assert.equal(0, s.model.stray)
  end)
end)
