"""rlq: workers package."""
