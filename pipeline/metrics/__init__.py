"""Evaluation: metric math, feature extractors, the evaluator and the evaluate stage's logic."""
