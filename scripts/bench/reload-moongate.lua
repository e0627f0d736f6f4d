-- moongate for the reload-latency figure of `make bench` (-w 1, pinned to CPU 0): 100 routes,
-- a quarter of them with a Lua access hook. scripts/bench/reload_latency.py fills ROUTES
-- (between @ signs) for each reload; the other placeholders are filled in by scripts/bench.sh.
gateway {
  access_log = "off",
  pid_file = "@TMP@/@NAME@.pid",
  log_level = "warn",
}

listen { port = @PORT@, host = "127.0.0.1" }

shared "counts" { size = "16m" }

upstream "origin" {
  "127.0.0.1:@ORIGIN@",
  keepalive = 64,
}

@ROUTES@

route "/*" { upstream = "origin" }
