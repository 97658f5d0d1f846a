"""What the performance and quality benchmarks share: server start/stop, and loading the package
on a bare GPU machine, comparing two relevance vectors."""
