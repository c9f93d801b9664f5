"""The run record and its folder."""
