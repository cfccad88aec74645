-- The README's example runs as written and prints what its comments say.
describe("the README example", function()
  local function read_example()
    local f = assert(io.open("README.md", "rb"))
    local text = f:read("*a")
    f:close()
    local body = text:match("## Example%s+```lua\n(.-)```")
    assert.is_string(body, "README.md has an Example section with a lua block")
    return body
  end

  it("prints what its comments promise", function()
    local body = read_example()
    local printed = {}
    local env = setmetatable({
      print = function(...)
        local parts = {}
        for i = 1, select("#", ...) do
          parts[#parts + 1] = tostring((select(i, ...)))
        end
        printed[#printed + 1] = table.concat(parts, " ")
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
      local want = line:match("^print%b()%s*%-%->%s*(.-)%s*$")
      if want then
        expected[#expected + 1] = want
      end
    end
    assert.equal(#expected, #printed)
    for i, want in ipairs(expected) do
      -- compare the words; comments may add a parenthesised note
      local got = printed[i]:gsub("%s+", " ")
      want = want:gsub("%s*%(.*%)$", ""):gsub("%s+", " ")
      assert.equal(want, got)
    end
  end)
end)
