-- moongate as the reverse proxy under test (bench.sh runs it with -w 1, pinned to CPU 0).
-- @TMP@, @NAME@, @PORT@ and @ORIGIN@ are filled in by scripts/bench.sh. Like the nginx and
-- HAProxy configs: no access log, 64 idle upstream connections, keep-alive limits out of the
-- way. bench.sh falls back to moongate-min.lua if this file is rejected.
gateway {
  access_log = "off",
  pid_file = "@TMP@/@NAME@.pid",
  log_level = "warn",
}

listen { port = @PORT@, host = "127.0.0.1" }

upstream "o" {
  "127.0.0.1:@ORIGIN@",
  keepalive = 64,
  keepalive_timeout = 600,
  keepalive_requests = 100000000,
}

route "/*" { upstream = "o" }

limits {
  max_connections = 20000,
  keepalive_timeout = 600,
  keepalive_requests = 100000000,
}
