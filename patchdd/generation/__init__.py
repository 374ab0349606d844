"""The generative methods' math: sampling primitives, D3HR's group sampling, and the work-item plan of ``generate``."""
