"""Ways to run a plan besides the local thread pool in `execute.py` (which both share for the rest)."""
