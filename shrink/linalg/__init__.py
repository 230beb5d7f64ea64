"""Shared numerics in float64: streamed second moments, truncated and whitened SVD, pivoted
Cholesky / interpolative decompositions and folds, and the damped Hessian of GPTQ and SparseGPT."""
