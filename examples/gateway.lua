-- moongate's default configuration: `make run` starts it.
--
-- It is self-contained: the "demo" listener on port 9001 plays the backend services with
-- fixed responses, and the public listener on port 8080 proxies to it. Try:
--   curl -i localhost:8080/users/42
--   curl -i localhost:8080/orders/7/items
--   curl -i localhost:8080/status
--   curl -i -X DELETE localhost:8080/users/42     (405: the route only takes GET)
--   curl -i localhost:9001/hello/ada               (a Lua handler on the demo listener)

gateway {
  workers = "auto",                 -- one worker per core; `-w N` on the command line wins
  pid_file = "/tmp/moongate.pid",   -- `moongate stop` reads it
  access_log = "stdout",            -- one JSON line per request
  log_level = "info",
  redact_query = { "apikey", "token", "access_token" },
}

limits {
  header_timeout = "10s",
  body_bytes = "1m",
}

listen { port = 8080 }                                   -- the public listener
listen "demo" { port = 9001, host = "127.0.0.1" }        -- the demo backends

upstream "users"  { "127.0.0.1:9001", keepalive = 64 }
upstream "orders" { "127.0.0.1:9001", timeout = "2s" }

-- Public routes: proxied to the demo backends.
route "GET /users/:id"  { upstream = "users" }
route "GET /orders/*"   { upstream = "orders" }
route "GET /v1/users/:id" { upstream = "users", rewrite = "/users/:id" }
route "GET /status"     { respond = { 200, { status = "ok", service = "moongate" } } }

-- The demo backends (served only on the "demo" listener).
route "GET /users/:id" {
  listen = "demo",
  respond = { 200, { id = 1, name = "Ada Lovelace", plan = "gold" } },
}
route "GET /orders/*" {
  listen = "demo",
  respond = { 200, { { id = 7, total = 42.5 }, { id = 8, total = 9.99 } } },
}

-- A Lua handler (README "Lua hooks"): the route answers from Lua, with no backend behind it.
route "GET /hello/:name" {
  listen = "demo",
  handler = function(req) return 200, { hello = req.params.name } end,
}
