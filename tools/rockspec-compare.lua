-- rockspec-compare.lua SCM RELEASE: fails, naming each difference, when the
-- two rockspecs' `build` tables differ, or when RELEASE's source.tag is not
-- "v" followed by its version.
-- rockspec-compare.lua --tag-only RELEASE: the source.tag check alone.
-- rockspec-compare.lua --covers SCM FILE...: fails, naming them, when a Lua
-- file (lua/<name>.lua) or a C source (csrc/<name>.c) among FILEs is not in
-- SCM's build table, or the table names a file not among them.
-- A rockspec is Lua: a run of assignments, loaded here into a table of its
-- own.

local function load_rockspec(path)
  local env = {}
  local chunk, err
  if setfenv then -- 5.1, LuaJIT
    chunk, err = loadfile(path)
    if chunk then setfenv(chunk, env) end
  else
    chunk, err = loadfile(path, "t", env)
  end
  if not chunk then error(err, 0) end
  local ok, perr = pcall(chunk)
  if not ok then error(path .. ": " .. tostring(perr), 0) end
  return env
end

local function key_text(k)
  if type(k) == "string" and k:match("^[%a_][%w_]*$") then return "." .. k end
  if type(k) == "string" then return "[" .. string.format("%q", k) .. "]" end
  return "[" .. tostring(k) .. "]"
end

local function value_text(v)
  if type(v) == "string" then return string.format("%q", v) end
  if type(v) == "table" then return "a table" end
  return tostring(v)
end

-- Appends to `out` one line per difference between a and b under `path`.
local function compare(a, b, path, names, out)
  if type(a) == "table" and type(b) == "table" then
    local keys, seen = {}, {}
    for k in pairs(a) do keys[#keys + 1] = k; seen[k] = true end
    for k in pairs(b) do if not seen[k] then keys[#keys + 1] = k end end
    table.sort(keys, function(x, y)
      if type(x) == type(y) then return x < y end
      return type(x) < type(y)
    end)
    for _, k in ipairs(keys) do
      compare(a[k], b[k], path .. key_text(k), names, out)
    end
  elseif a ~= b then
    if a == nil then
      out[#out + 1] = string.format("%s: only in %s (%s)", path, names[2], value_text(b))
    elseif b == nil then
      out[#out + 1] = string.format("%s: only in %s (%s)", path, names[1], value_text(a))
    else
      out[#out + 1] = string.format("%s: %s in %s, %s in %s",
        path, value_text(a), names[1], value_text(b), names[2])
    end
  end
end

-- --covers: the files of the tree against the build table's.
if arg[1] == "--covers" then
  local path = arg[2]
  local ok, spec = pcall(load_rockspec, path or "")
  if not ok then
    io.stderr:write("rockspec-compare: ", tostring(spec), "\n")
    os.exit(1)
  end
  local listed, problems = {}, {}
  for name, m in pairs(spec.build and spec.build.modules or {}) do
    if type(m) == "string" then
      listed[m] = name
    else
      for _, src in ipairs(m.sources or {}) do listed[src] = name end
    end
  end
  local present = {}
  for i = 3, #arg do
    local f = arg[i]:gsub("^%./", "")
    present[f] = true
    if (f:match("^lua/.*%.lua$") or f:match("^csrc/[^/]*%.c$")) and not listed[f] then
      problems[#problems + 1] = f .. " is in the tree but not in the build table"
    end
  end
  for f, name in pairs(listed) do
    if not present[f] then
      problems[#problems + 1] = string.format("%s (module %s) is not in the tree", f, name)
    end
  end
  table.sort(problems)
  if #problems > 0 then
    io.stderr:write(string.format("rockspec-compare: %s does not build the tree:\n  %s\n",
      path, table.concat(problems, "\n  ")))
    os.exit(1)
  end
  print(string.format("rockspec: %s builds every Lua module and C source of the tree", path))
  os.exit(0)
end

-- RELEASE's source.tag must be "v" followed by its version: the problem
-- appended to `problems`, if any.
local function check_tag(release, release_path, problems)
  local base = tostring(release.version):match("^(.-)%-%d+$")
  local tag = type(release.source) == "table" and release.source.tag
  if not base or tag ~= "v" .. base then
    problems[#problems + 1] = string.format("%s: source.tag is %s, version %s wants \"v%s\"",
      release_path, value_text(tag), value_text(release.version), tostring(base))
  end
end

if arg[1] == "--tag-only" then
  local ok, release = pcall(load_rockspec, arg[2] or "")
  local problems = {}
  if ok then check_tag(release, arg[2], problems) end
  if not ok or #problems > 0 then
    io.stderr:write("rockspec-compare: ", ok and problems[1] or tostring(release), "\n")
    os.exit(1)
  end
  print(string.format("rockspec: %s names its release tag %q", arg[2], release.source.tag))
  os.exit(0)
end

local scm_path, release_path = arg[1], arg[2]
if not scm_path or not release_path then
  io.stderr:write("usage: rockspec-compare.lua SCM-ROCKSPEC RELEASE-ROCKSPEC\n")
  os.exit(2)
end
local ok, scm = pcall(load_rockspec, scm_path)
local ok2, release
if ok then ok2, release = pcall(load_rockspec, release_path) end
if not (ok and ok2) then
  io.stderr:write("rockspec-compare: ", tostring(ok and release or scm), "\n")
  os.exit(1)
end

local problems = {}
compare(scm.build, release.build, "build", { scm_path, release_path }, problems)
if #problems > 0 then
  for i, line in ipairs(problems) do problems[i] = "  " .. line end
  table.insert(problems, 1, "the build tables differ (a module or source added to one"
    .. " rockspec belongs in both):")
end
check_tag(release, release_path, problems)

if #problems > 0 then
  io.stderr:write(string.format("rockspec-compare: %s and %s disagree:\n  %s\n",
    scm_path, release_path, table.concat(problems, "\n  ")))
  os.exit(1)
end
print(string.format("rockspec: %s has the build table of %s", release_path, scm_path))
