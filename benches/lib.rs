//! Shared fixtures for Weir's benchmarks (the benchmarks themselves are under `benches/`).
