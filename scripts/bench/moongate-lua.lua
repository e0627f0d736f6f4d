-- moongate for the Lua scenarios of `make bench` (bench.sh runs it with -w 1, pinned to CPU 0);
-- scripts/bench/nginx-lua.conf does the same work with nginx + lua-nginx-module.
--   GET /a: "API key + counter": the access hook checks X-Api-Key against KEYS (100 keys),
--           answers 401 JSON if absent or unknown, counts the request per key in a shared
--           dictionary, then the route proxies to the origin (which answers /a with 1 KiB).
--   GET /b: "aggregation": fetches /users/1, /orders/1 and /reviews/1 from the origin in
--           parallel and answers one merged JSON document, with mg.aggregate.
--   GET /b2: the same with mg.fetch_all and Lua tables (decode, build, encode).
--   GET /count: the counter of the key in X-Api-Key (bench.sh checks that /a counts).
--   /*:     plain proxy (bench.sh's readiness probe uses /12 and /1k).
-- The placeholders (TMP, NAME, PORT, ORIGIN, KEYS_SET, each between @ signs) are filled in by
-- scripts/bench.sh.
gateway {
  access_log = "off",
  pid_file = "@TMP@/@NAME@.pid",
  log_level = "warn",
}

listen { port = @PORT@, host = "127.0.0.1" }

shared "counts" { size = "16m" }

-- 256 idle upstream connections (nginx-lua.conf: the same): /b keeps up to 150 origin requests
-- in flight (50 clients x 3), and a smaller pool would measure connection set-up, not Lua.
upstream "origin" {
  "127.0.0.1:@ORIGIN@",
  keepalive = 256,
  keepalive_timeout = 600,
  keepalive_requests = 100000000,
}

limits {
  max_connections = 20000,
  keepalive_timeout = 600,
  keepalive_requests = 100000000,
}

local KEYS = { @KEYS_SET@ }
local counts = mg.shared.counts

route "GET /a" {
  upstream = "origin",
  access = function(req)
    local k = req:header("x-api-key")
    if not k or not KEYS[k] then return 401, { error = "bad key" } end
    counts:incr(k, 1)
  end,
}

-- The aggregation endpoint as README's tutorial writes it: mg.aggregate nests each backend's
-- document under its key (passed through as checked JSON text, see mg.json.raw).
route "GET /b" {
  handler = function(req)
    return mg.aggregate {
      { "origin", "/users/1", key = "user" },
      { "origin", "/orders/1", key = "orders" },
      { "origin", "/reviews/1", key = "reviews" },
    }
  end,
}

-- The same document built by hand as nginx-lua.conf builds it: every body decoded into Lua
-- tables, one table made of them, encoded.
route "GET /b2" {
  handler = function(req)
    local u, o, r = mg.fetch_all {
      { "origin", "/users/1" },
      { "origin", "/orders/1" },
      { "origin", "/reviews/1" },
    }
    if not (u and o and r) or u.status ~= 200 or o.status ~= 200 or r.status ~= 200 then
      return 502, { error = "a backend failed" }
    end
    return 200, { user = u.json, orders = o.json, reviews = r.json }
  end,
}

-- bench.sh's check that /a counted: the count of the key in X-Api-Key.
route "GET /count" {
  handler = function(req) return 200, { n = counts:get(req:header("x-api-key") or "-") } end,
}

route "/*" { upstream = "origin" }
