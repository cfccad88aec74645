-- The README's examples run as written and print what their comments say.
describe("the README", function()
  local function read_readme()
    local f = assert(io.open("README.md", "rb"))
    local text = f:read("*a")
    f:close()
    return text
  end

  local function example(heading)
    local body = read_readme():match("## " .. heading .. "\n.-```lua\n(.-)```")
    assert.is_string(body, "README.md has a lua block under " .. heading)
    return body
  end

  -- Runs body, returns its printed lines and the lines its `--> ` comments
  -- promise, both sorted (threads may print in another order than the
  -- comments are written in).
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

  local function has(module)
    return (pcall(require, module))
  end

  it("Example prints what its comments promise", function()
    local printed, expected = run(example("Example"))
    assert.equal(3, #expected)
    assert.same(expected, printed)
  end)

  local cq = has("cqueues")
  local cq_it = cq and it or pending
  cq_it("cqueues example prints what its comments promise", function()
    local printed, expected = run(example("cqueues"))
    assert.equal(4, #expected)
    assert.same(expected, printed)
  end)

  local copas = has("copas") and has("socket")
  local copas_it = copas and it or pending
  copas_it("copas example prints what its comments promise", function()
    local printed, expected = run(example("copas"))
    assert.equal(2, #expected)
    assert.same(expected, printed)
  end)

  -- (spec/44-openresty_swr_spec.lua runs it inside nginx)
  it("the stale-while-revalidate recipe is spec/swr.lua, as written", function()
    local body = example("Recipe: stale%-while%-revalidate over lua%-resty%-lrucache")
    local f = assert(io.open("spec/swr.lua", "rb"))
    local file = f:read("*a")
    f:close()
    local function code(text) -- from the first require on
      return assert(text:match("\n(local lrucache = require.*)$"))
    end
    assert.equal(code(file), code(body))
  end)
end)
