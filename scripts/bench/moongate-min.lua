-- Fallback config for the bench when moongate.lua's tuning keys are rejected: only the keys
-- the benchmark cannot do without. @PORT@ and @ORIGIN@ are filled in by scripts/bench.sh.
listen { port = @PORT@ }
upstream "o" { "127.0.0.1:@ORIGIN@" }
route "/*" { upstream = "o" }
limits { max_connections = 20000, keepalive_timeout = 600 }
