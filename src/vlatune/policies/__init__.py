"""Policies: backbones x action heads, saved and loaded as folders (see policy.py)."""

from vlatune.policies.policy import VLAPolicy, build_policy

__all__ = ["VLAPolicy", "build_policy"]
