"""`make bench`: throughput and latency of the service against its own ceiling and a naive peer."""
