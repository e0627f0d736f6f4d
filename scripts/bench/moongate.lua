-- moongate as the reverse proxy under test (bench.sh runs it with -w 1, pinned to CPU 0).
-- @PORT@ and @ORIGIN@ are filled in by scripts/bench.sh. Keep-alive limits are raised to match
-- the nginx and HAProxy configs; bench.sh falls back to moongate-min.lua if this is rejected.
listen { port = @PORT@, host = "127.0.0.1" }

upstream "o" {
  "127.0.0.1:@ORIGIN@",
  keepalive_max_idle = 64,
  keepalive_timeout = 600,
  keepalive_requests = 100000000,
}

route "/*" { upstream = "o" }

limits {
  max_connections = 20000,
  keepalive_timeout = 600,
  keepalive_requests = 100000000,
}
