"""rlq: rlq package."""
