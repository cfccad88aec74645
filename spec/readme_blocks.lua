-- The README's fenced code blocks, for the specs that run them as written.
local M = {}

--- The text of the file at path.
function M.read(path)
  local f = assert(io.open(path, "rb"))
  local text = f:read("*a")
  f:close()
  return text
end

--- README.md's fenced blocks, in order: { lang, body, line }. A block
-- inside a list item loses the indentation of its fence.
function M.blocks()
  local out, lang, pad, body, start = {}, nil, nil, nil, nil
  local n = 0
  for line in (M.read("README.md") .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    local indent, fence = line:match("^(%s*)```(%S*)%s*$")
    if lang == nil and fence and fence ~= "" then
      lang, pad, body, start = fence, indent, {}, n
    elseif lang ~= nil and fence == "" then
      out[#out + 1] = { lang = lang, body = table.concat(body, "\n") .. "\n", line = start }
      lang = nil
    elseif lang ~= nil then
      if line:sub(1, #pad) == pad then
        line = line:sub(#pad + 1)
      end
      body[#body + 1] = line
    end
  end
  assert(lang == nil, "README.md: a ``` block that never ends")
  return out
end

--- The body of the one block of lang that holds marker; raises if there
-- is none, or more than one.
function M.block(lang, marker)
  local found
  for _, b in ipairs(M.blocks()) do
    if b.lang == lang and b.body:find(marker, 1, true) then
      assert(not found, ("README.md: two %s blocks hold %q (lines %d and %d)")
                        :format(lang, marker, found and found.line or 0, b.line))
      found = b
    end
  end
  assert(found, ("README.md: no %s block holds %q"):format(lang, marker))
  return found.body
end

return M
