"""Performance benchmarks: time, memory and throughput ratios, CPU and GPU (bench/README.md)."""
