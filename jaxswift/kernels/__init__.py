"""Hand-written kernels XLA does not have, each a custom call with a plain-JAX fallback (docs/kernels.md)."""
