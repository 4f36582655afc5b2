"""`resilient report`: one self-contained HTML page of a run (curves, stragglers, timeline, goodput)."""
