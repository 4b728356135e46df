"""Quality: what the platform's agents get right, and at what cost, on fixtures no model can
know. See `python -m bench.quality --help` (`bench.quality.__main__`)."""
