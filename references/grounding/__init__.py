"""Grounding benchmark: the cases, the snapshot they come from, and one case measured."""
