-- The cqueues backend under a real cqueues controller.
local schedulers = require "schedulers"
local suite = require "scheduler_suite"

describe("backend cqueues", function()
  local probe, missing = schedulers.cqueues()
  for _, c in ipairs(suite.cases) do
    local why = missing or (c.needs and c.needs(probe))
    if why then
      pending(c.name .. " (" .. why .. ")")
    else
      it(c.name, function() c.fn(schedulers.cqueues) end)
    end
  end
end)
