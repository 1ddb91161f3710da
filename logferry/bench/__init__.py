"""`logferry bench SUITE`: benchmarks that measure logferry beside a reference in the same run."""
