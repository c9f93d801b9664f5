"""Scoring runs on held-out rows, and comparing them."""
