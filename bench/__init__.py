"""flagsim benchmark suite (`make bench`): side-by-side ratios written to docs/benchmarks.md."""
