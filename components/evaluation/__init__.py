"""Scoring answers and retrieval on held-out questions (used by the retraining gate and `tandem eval`)."""
