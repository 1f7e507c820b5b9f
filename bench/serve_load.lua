-- wrk script for bench/serve_load.sh: POSTs the body in $BODY_FILE to the
-- URL's path and prints one JSON line with the latency percentiles.
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "requests_per_second": %.2f, "non_2xx": %d, "socket_errors": %d, '
      .. '"p50_ms": %.4f, "p90_ms": %.4f, "p99_ms": %.4f, "p999_ms": %.4f, "max_ms": %.4f, "mean_ms": %.4f}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6), e.status,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency:percentile(99.9) / 1e3, latency.max / 1e3, latency.mean / 1e3))
end
