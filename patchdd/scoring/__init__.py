"""Stage I's math: relevance score maps, patch windows and DIFT vectors, as plain functions on tensors."""
