"""tokenpool.bench: benchmarks behind `tokenpool bench` (engine now; swap and serve later)."""
