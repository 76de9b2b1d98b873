"""fastcur benchmarks (installed as `fastcur.benchmarks`): one script per op family and the runner."""
