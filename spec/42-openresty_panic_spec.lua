-- A panic in OpenResty: ngx_lua logs an error that ends a request only if
-- it is a string (a panic, a table, shows as "runtime error: unknown
-- reason"), so the leader reports fn's error to nginx's error log itself,
-- once per execution, while callers that catch the panic still get it
-- whole. Debian's nginx with the Lua module (nginx_server.lua), serving
-- ngx_app.lua's raise_* handlers.
local ns = require "nginx_server"

local usable, why = ns.find()

if not usable then
  describe("OpenResty panics", function()
    pending("a real nginx (" .. why .. ")")
  end)
  return
end

-- The error log's entries (an entry runs from its time stamp to the next)
-- that contain `text`.
local function entries(log, text)
  local out, cur = {}, nil
  for line in log:gmatch("[^\n]*") do
    if line:match("^%d%d%d%d/%d%d/%d%d %d%d:%d%d:%d%d ") then
      cur = { line }
      out[#out + 1] = cur
    elseif cur then
      cur[#cur + 1] = line
    end
  end
  local hits = {}
  for _, e in ipairs(out) do
    local s = table.concat(e, "\n")
    if s:find(text, 1, true) then
      hits[#hits + 1] = s
    end
  end
  return hits
end

local function escape(s)
  return (s:gsub("[^%w_.-]", function(c) return ("%%%02X"):format(c:byte()) end))
end

describe("OpenResty panics", function()
  local server, port

  setup(function()
    server = assert(ns.start(120, { http = "lua_shared_dict raise_sf 1m;" }))
    port = server.port
  end)

  teardown(function()
    if server then
      server.stop()
    end
  end)

  -- g:stats()[name] of ngx_app's group `group`
  local function stat(group, name)
    return tonumber(ns.get(port, "/stats?group=" .. group).fields[name])
  end

  -- { what, handler, key, the key the report names }: one request whose
  -- panic nobody catches, one report, with the key and the traceback
  -- where fn raised
  local unhandled = {
    { "an unhandled panic's message and the leader's traceback reach the error log",
      "raise_unhandled", "k1", "k1" },
    { "a panic raised again through an outer call is reported once, by the inner call",
      "raise_nested", "k4", "k4-inner" },
    { "a group with shm reports its leader's panic once", "raise_shm", "k5", "k5" },
  }
  for _, row in ipairs(unhandled) do
    local what, handler, key, named = row[1], row[2], row[3], row[4]
    it(what, function()
      local msg = "database is down (" .. handler .. ")"
      local a = ns.get(port, "/" .. handler .. "?key=" .. key .. "&msg=" .. escape(msg))
      assert.equal(500, a.status)
      local found = entries(server.log(), msg)
      assert.equal(1, #found, "reports of the panic:\n" .. table.concat(found, "\n"))
      local report = found[1]
      assert.matches("%[error%]", report)
      assert.matches("singleflight: ", report, 1, true)
      assert.matches('"' .. named .. '"', report, 1, true) -- the key, quoted
      -- the leader's own traceback, where fn raised
      assert.matches("stack traceback:", report, 1, true)
      assert.matches("in function 'query_db'", report, 1, true)
    end)
  end

  it("a panic caught with pcall keeps is_panic and its fields (and is reported once)", function()
    local msg = "database is down (caught)"
    local a = ns.get(port, "/raise_caught?key=k2&msg=" .. escape(msg))
    assert.equal(200, a.status)
    assert.equal("false", a.fields.ok)
    assert.equal("true", a.fields.is_panic)
    assert.equal("k2", a.fields.key)
    assert.matches(msg, a.fields.value, 1, true)
    assert.equal("true", a.fields.traceback_has_query)
    assert.equal("singleflight: ", a.fields.text:sub(1, 14))
    assert.matches(msg, a.fields.text, 1, true)
    assert.equal(1, #entries(server.log(), msg))
  end)

  it("a stampede of 20 callers on a raising fn logs the message once per execution", function()
    local msg = "database is down (stampede)"
    local function counts()
      return { stat("raise_stampede", "executions"), stat("raise_stampede", "shared"),
               stat("raise_stampede", "panics") }
    end
    local before = counts()
    local answers = ns.batch(port, ns.times(20, "/raise_stampede?key=k3&n=20&msg="
                                               .. escape(msg)), 30)
    for _, a in ipairs(answers) do
      assert.equal(500, a.status)
    end
    local after = counts()
    -- one execution (a panic), whose panic went to all 20
    assert.same({ before[1] + 1, before[2] + 19, before[3] + 1 }, after)
    local found = entries(server.log(), msg)
    assert.equal(1, #found, "reports of the panic:\n" .. table.concat(found, "\n"))
    assert.matches('"k3"', found[1], 1, true)
  end)

  it("a duplicate that gave up waiting and ran fn itself reports its own panic", function()
    local msg = "database is down (unshared)"
    local slow = ns.open(port, "/raise_slow?key=k6")
    ns.eventually(function() return stat("raise_unshared", "inflight") == 1 end,
                  "the slow leader", 5)
    local a = ns.get(port, "/raise_unshared?key=k6&msg=" .. escape(msg))
    assert.equal(500, a.status)
    assert.equal(1, stat("raise_unshared", "timeouts"))
    local found = entries(server.log(), msg)
    assert.equal(1, #found, "reports of the panic:\n" .. table.concat(found, "\n"))
    assert.matches('"k6"', found[1], 1, true)
    assert.equal("slow", ns.collect({ slow }, 5)[1].fields.value)
  end)
end)
