"""Evaluation: the LIBERO runner, built-in policies, results with Wilson intervals."""
