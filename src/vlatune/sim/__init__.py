"""LIBERO simulation: headless set-up, the environment wrapper and the `sim check` smoke test."""
