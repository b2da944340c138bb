"""The engine: the speculative step for B >= 1 rows, continuous batching over it, verification and the fast path."""
