"""The GPs of the GAPA layers: kernels, neighbour search, inducing points, conditioning."""
