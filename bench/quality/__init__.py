"""Quality benchmarks: faithfulness (token flipping) and grounding (source attribution)."""
