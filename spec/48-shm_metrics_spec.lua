-- The README's Prometheus example, as written there: its module and its
-- location in an nginx with four workers, a stampede on a group with shm,
-- then the text a scrape gets, parsed, from whichever worker answers.
local ns = require "nginx_server"

local function readme_block(lang, marker)
  local f = assert(io.open("README.md", "rb"))
  local text = f:read("*a")
  f:close()
  for body in text:gmatch("```" .. lang .. "\n(.-)```") do
    if body:find(marker, 1, true) then
      return body
    end
  end
  error("README.md has no " .. lang .. " block with " .. marker)
end

--- Prometheus' text format: { [metric] = { type, samples = { [labels] = value } } };
-- raises on a line that is not of it.
local function parse(text)
  local metrics, current = {}, nil
  for line in text:gmatch("([^\n]*)\n") do
    local name, kind = line:match("^# TYPE ([%a_:][%w_:]*) (%a+)$")
    if name then
      assert(not metrics[name], "a second TYPE for " .. name)
      current = { type = kind, samples = {} }
      metrics[name] = current
    elseif not line:match("^# HELP [%a_:][%w_:]* .*$") then
      local sample, labels, value = line:match("^([%a_:][%w_:]*)(%b{}) (%S+)$")
      assert(sample, "not a sample: " .. line)
      assert(metrics[sample] == current, "a sample of " .. sample .. " without its TYPE")
      assert(labels:match('^{[%a_][%w_]*="[^"\\\n]*"}$'), "labels: " .. labels)
      current.samples[labels] = assert(tonumber(value), "value: " .. value)
    end
  end
  return metrics
end

local usable, why = ns.find()
if not usable then
  describe("the README's Prometheus example", function()
    pending("a real nginx (" .. why .. ")")
  end)
  return
end

describe("the README's Prometheus example", function()
  local server, port, dir

  setup(function()
    dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. dir))
    local f = assert(io.open(dir .. "/sf_metrics.lua", "w"))
    f:write(readme_block("lua", "-- sf_metrics.lua"))
    f:close()
    server = assert(ns.start(60, {
      workers = 4,
      http = "  lua_shared_dict singleflight 1m;\n",
      init = ('package.path = "%s/?.lua;" .. package.path\n'):format(dir)
             .. "app.init_worker = function() end",
      servers = [[
  server {
    listen 127.0.0.1:@PORT2@ reuseport;
]] .. readme_block("nginx", "/metrics") .. [[
    location = /users {
      content_by_lua_block {
        local users = require("sf_metrics").groups.users
        local v = users:call("user:1", function()
          ngx.sleep(1)
          return "alice"
        end)
        ngx.say("value=", v, "\npid=", ngx.worker.pid())
      }
    }
  }
]],
    }))
    port = server.ports[2]
  end)

  teardown(function()
    if server then
      server.stop()
    end
    if dir then
      os.execute("rm -rf " .. dir)
    end
  end)

  it("exposes the instance's counters, from whichever worker answers", function()
    ns.eventually(function() return #server.workers() == 4 end, "four workers", 10)
    local answers = ns.batch(port, ns.times(40, "/users"), 30)
    assert.same({ alice = 40 }, ns.tally(answers, "value"))
    local workers = {}
    for _, a in ipairs(answers) do
      workers[a.fields.pid] = true
    end
    assert.is_truthy(next(workers, next(workers)), "the connections reached one worker only")
    local seen = 0
    for _ = 1, 12 do
      local a = ns.get(port, "/metrics")
      assert.equal(200, a.status)
      assert.matches("^text/plain; version=0.0.4", a.headers["content-type"])
      local m = parse(a.body)
      local function value(name)
        local metric = assert(m["singleflight_" .. name .. "_total"], name)
        assert.equal("counter", metric.type)
        return metric.samples['{group="users"}']
      end
      assert.equal(40, value("calls"))
      assert.equal(1, value("executions"))
      assert.equal(39, value("shared"))
      assert.equal(0, value("panics"))
      assert.equal(0, value("timeouts"))
      seen = seen + 1
    end
    assert.equal(12, seen)
  end)
end)
