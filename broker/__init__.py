"""rlq: broker package."""
