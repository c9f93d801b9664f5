"""Notebook views of engine state: the live training panel, the method picker and the comparison of runs."""
