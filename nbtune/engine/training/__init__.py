"""The pipeline that trains one run, and what it needs while it trains."""
