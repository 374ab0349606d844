"""Diffusion priors: the one Stable Diffusion stack (build, load, save, encode, DIFT hook) and the prior's
training objectives."""
