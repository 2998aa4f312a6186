"""Reference harnesses beside mae_jax: the official MAE code written out in PyTorch, and the
comparisons and speed ratios against it. Run from the repository root as
`python -m benchmarks.<name>` (see each module's docstring)."""
