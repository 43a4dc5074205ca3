"""rlq: learner package."""
