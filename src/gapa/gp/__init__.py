"""The Gaussian process of one call site: kernels, inducing points, conditioning, search."""
