-- wrk script for bench/run.sh: prints one machine-readable line at the end with the counts and
-- the latency percentiles wrk's own --latency output lacks (p99.9). Latencies are microseconds.
-- errors.status counts responses with status > 399.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "MESHGATE_BENCH requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d p50_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
