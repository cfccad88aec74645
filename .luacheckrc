std = "max"
max_line_length = 100
files["spec"] = { std = "+busted" }
-- Code that runs inside nginx (OpenResty's LuaJIT): the ngx_lua globals.
files["lua/singleflight/backend/ngx.lua"] = { std = "ngx_lua" }
files["spec/ngx_*.lua"] = { std = "ngx_lua" }
files["tools/demo_app.lua"] = { std = "ngx_lua" }
files["tools/demo_fleet_app.lua"] = { std = "ngx_lua" }
files["lua/singleflight/redis.lua"] = { std = "ngx_lua" }
