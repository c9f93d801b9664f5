"""Notebook views of engine state: the live training panel (and, later, the picker and comparison)."""
