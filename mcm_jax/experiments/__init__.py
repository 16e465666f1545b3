"""The experiments ``main`` dispatches to: each only orchestrates (build -> train / evaluate ->
report); the math is in the pure modules and ``objectives`` maps configs onto it."""
