"""One-time measurements behind decisions in docs/performance.md (`make bench-floor`,
`make bench-provider`); not part of `make bench` or `make test`."""
