"""sparsevd benchmarks (installed as sparsevd.benchmarks; run from the repository root as `python -m benchmarks.<name>`). See ../shared/BENCHMARKS.md and benchmarks/NOTES.md."""
