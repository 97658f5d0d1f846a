"""Faithfulness benchmark: the PA-LRP paper's token-flipping protocol on real text.

Run ``python -m bench.faithfulness --help``; results and method notes in docs/faithfulness.md.
"""
