-- The README's examples run as written and print what their comments say.
-- Every ```lua and ```nginx block of it is accounted for below: run here,
-- run in a real nginx by the spec named, or a fragment, with the reason.
-- A block that is none of these (a new example nobody runs) fails.

--- The README's blocks, each found by a string only it holds.
--   run = "lua"        runs here on every Lua (plain coroutines)
--   run = <module>     runs here where that module loads
--   spec = <file>      runs in a real nginx, in that spec file
--   fragment = <why>   does not run alone
local BLOCKS = {
  { "lua", 'singleflight.new { backend = "coroutine" }', run = "lua" },
  { "lua", "error({ code = 503 })", run = "lua" },
  { "lua", 'require "cqueues"', run = "cqueues" },
  { "lua", 'require "copas"', run = "copas" },
  { "nginx", "load_module", spec = "44-openresty_readme_spec.lua" },
  { "lua", "-- lua/users.lua", spec = "44-openresty_readme_spec.lua" },
  { "lua", "-- swr.lua", spec = "44-openresty_swr_spec.lua" },
  { "lua", "-- sf_metrics.lua", spec = "48-shm_metrics_spec.lua" },
  { "nginx", "location = /metrics", spec = "48-shm_metrics_spec.lua" },
  { "nginx", "lua_shared_dict singleflight 10m;   # for singleflight alone",
    fragment = "one directive of an http block (the quick start's nginx.conf has it whole)" },
  { "lua", 'local v, err, shared = group:call(key, fetch, key)',
    fragment = "the option shm in two lines: key and fetch are the reader's" },
  { "lua", 'local buffer = require "string.buffer"',
    fragment = "a codec option's value, for a group with shm (OpenResty); "
               .. "the shm specs run table codecs across workers (spec/ngx_shm_app.lua)" },
  { "lua", 'host = "10.0.0.5", port = 6379',
    fragment = "the option redis with a server of the reader's" },
  { "lua", 'master_name = "mymaster"',
    fragment = "the option redis behind the reader's sentinels (spec/49-redis_sentinel_spec.lua "
               .. "runs them)" },
  { "lua", 'cluster = { { host = "10.0.0.5", port = 7000 }',
    fragment = "the option redis on the reader's cluster (spec/49-redis_cluster_spec.lua "
               .. "runs one)" },
  { "lua", 'local backend = {',
    fragment = "the backend interface, each field a stub; spec/05-wait_spec.lua "
               .. "and spec/16-options_spec.lua run backends of this shape" },
}

local readme = require "readme_blocks"
local read, blocks = readme.read, readme.blocks

--- The block that entry names: exactly one, or an error.
local function block_of(entry)
  return readme.block(entry[1], entry[2])
end

-- Runs body, returns its printed lines and the lines its `--> ` comments
-- promise, each list sorted (threads may print in another order than the
-- comments are written in). In a promise, "..." stands for any text.
local function run(body)
  local printed = {}
  local env = setmetatable({
    print = function(...)
      local parts = {}
      for i = 1, select("#", ...) do
        parts[#parts + 1] = tostring((select(i, ...)))
      end
      printed[#printed + 1] = table.concat(parts, " "):gsub("%s+", " ")
    end,
  }, { __index = _G })
  local chunk
  if setfenv then
    chunk = assert(loadstring(body, "=README"))
    setfenv(chunk, env)
  else
    chunk = assert(load(body, "=README", "t", env))
  end
  chunk()
  local expected = {}
  for line in body:gmatch("[^\n]+") do
    local want = line:match("print%b().-%-%->%s*(.-)%s*$")
    if want then
      want = want:gsub("%s*%(.*%)$", ""):gsub("%s+", " ")
      expected[#expected + 1] = want
    end
  end
  table.sort(printed)
  table.sort(expected)
  return printed, expected
end

--- Each promise matched by a printed line of its own ("..." is any text).
local function assert_printed(expected, printed)
  assert.equal(#expected, #printed, "printed:\n" .. table.concat(printed, "\n"))
  local left = {}
  for i, p in ipairs(printed) do
    left[i] = p
  end
  for _, want in ipairs(expected) do
    local pattern = "^" .. want:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%0")
                              :gsub("%%%.%%%.%%%.", ".*") .. "$"
    local hit
    for i, p in ipairs(left) do
      if p:match(pattern) then
        hit = i
        break
      end
    end
    assert(hit, ("nothing printed %q; printed:\n%s"):format(want, table.concat(printed, "\n")))
    table.remove(left, hit)
  end
end

local function has(module)
  return (pcall(require, module))
end

describe("the README", function()
  it("has each of its lua and nginx blocks run or listed as a fragment", function()
    local claimed = {}
    for _, entry in ipairs(BLOCKS) do
      assert(entry.run or entry.spec or entry.fragment, entry[2])
      local body = block_of(entry)
      assert(not claimed[body], "two entries name one block: " .. entry[2])
      claimed[body] = true
      if entry.spec then
        assert.matches("README", read("spec/" .. entry.spec), 1, true)
      end
    end
    for _, b in ipairs(blocks()) do
      if b.lang == "lua" or b.lang == "nginx" then
        assert(claimed[b.body], ("README.md line %d: a %s block that no spec runs "
                                         .. "and that is not listed as a fragment in %s")
                                        :format(b.line, b.lang, "spec/09-readme_spec.lua"))
      end
    end
  end)

  for _, entry in ipairs(BLOCKS) do
    if entry.run then
      local usable = entry.run == "lua" or has(entry.run)
      if entry.run == "copas" then
        usable = usable and has("socket")
      end
      local run_it = usable and it or pending
      run_it("runs the block with " .. entry[2] .. " and prints what its comments promise",
             function()
        local printed, expected = run(block_of(entry))
        assert.is_true(#expected >= 2, "the block promises what it prints")
        assert_printed(expected, printed)
      end)
    end
  end

  -- (spec/44-openresty_swr_spec.lua runs it inside nginx)
  it("has the stale-while-revalidate recipe as spec/swr.lua, as written", function()
    local body = block_of({ "lua", "-- swr.lua" })
    local function code(text) -- from the first require on
      return assert(text:match("\n(local lrucache = require.*)$"))
    end
    assert.equal(code(read("spec/swr.lua")), code(body))
  end)

  it("has docs/design.md name every file of lua/ and csrc/", function()
    local design = read("docs/design.md")
    local p = assert(io.popen("find lua csrc -type f -name '*.[ch]' -o -type f -name '*.lua'"))
    local files = 0
    for path in p:lines() do
      files = files + 1
      assert(design:find("`" .. path .. "`", 1, true), "docs/design.md does not name " .. path)
    end
    p:close()
    assert.is_true(files > 10)
  end)

  -- GitHub's anchors: the heading's text in lower case, without what is
  -- neither a letter, a digit, a space, a hyphen nor an underscore, spaces
  -- turned into hyphens; a second heading of the same text gets "-1".
  local function anchors(text)
    local seen, out, in_code = {}, {}, false
    for line in (text .. "\n"):gmatch("([^\n]*)\n") do
      if line:match("^%s*```") then
        in_code = not in_code
      elseif not in_code then
        local heading = line:match("^#+%s+(.-)%s*$")
        if heading then
          local slug = heading:lower():gsub("[^%w%- _]", ""):gsub(" ", "-")
          local n = seen[slug]
          seen[slug] = (n or 0) + 1
          out[n and (slug .. "-" .. n) or slug] = true
        end
      end
    end
    return out
  end

  it("has every link to a section of its own, or of docs/design.md, lead somewhere", function()
    local files = {
      ["README.md"] = read("README.md"),
      ["docs/design.md"] = read("docs/design.md"),
    }
    local targets = {}
    for name, text in pairs(files) do
      targets[name] = anchors(text)
    end
    local links = 0
    for name, text in pairs(files) do
      local dir = name:match("^(.*/)") or ""
      for target in text:gmatch("%]%(([^)%s]+)%)") do
        local file, anchor = target:match("^([^#]*)#(.+)$")
        if file and not target:match("^%a+://") then
          file = file == "" and name or (dir .. file):gsub("[^/]+/%.%./", "")
          assert(targets[file], name .. " links to a file not checked here: " .. target)
          assert(targets[file][anchor], name .. " links to a missing section: " .. target)
          links = links + 1
        end
      end
    end
    assert.is_true(links > 20)
  end)
end)
