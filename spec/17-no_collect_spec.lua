-- The library never runs a garbage collection: a full one stops an nginx
-- worker for as long as its heap takes to walk (seconds, for hundreds of
-- megabytes), and a step costs what the collector's debt says. Whether a
-- leader went away is decided from signals that cost no more than a look
-- per leader. This reads every file of the library for a call to the
-- collector (its other uses, "count" say, are not wanted either).

local function lua_files(dir)
  local p = assert(io.popen("find " .. dir .. " -name '*.lua' | sort"))
  local files = {}
  for line in p:lines() do
    files[#files + 1] = line
  end
  p:close()
  return files
end

-- The text of a Lua file with its comments and strings blanked, so that a
-- word in them does not count.
local function code_of(path)
  local f = assert(io.open(path, "rb"))
  local text = f:read("*a")
  f:close()
  text = text:gsub("%-%-%[(=*)%[.-%]%1%]", "")
  text = text:gsub("%-%-[^\n]*", "")
  text = text:gsub('"[^"\n]*"', '""'):gsub("'[^'\n]*'", "''")
  return text
end

describe("the library", function()
  local files = lua_files("lua") -- busted runs from the checkout

  it("has Lua files to read", function()
    assert.is_true(#files >= 5)
  end)

  for _, path in ipairs(files) do
    it(path:match("lua/.*$") .. " never calls the garbage collector", function()
      local code = code_of(path)
      assert.is_nil(code:find("collectgarbage", 1, true),
                    path .. " mentions collectgarbage outside comments")
    end)
  end

  it("the reader would catch a call", function()
    local tmp = os.tmpname()
    local f = assert(io.open(tmp, "w"))
    f:write('-- collectgarbage() in a comment is fine\nlocal x = "collectgarbage"\n',
            "local cg = collectgarbage\ncg()\n")
    f:close()
    local code = code_of(tmp)
    os.remove(tmp)
    assert.truthy(code:find("collectgarbage", 1, true))
    assert.equal(1, select(2, code:gsub("collectgarbage", "")))
  end)
end)
