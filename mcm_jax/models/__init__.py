"""Flax modules mapping (z, logsnr, cond) to a prediction; they know nothing of losses."""
