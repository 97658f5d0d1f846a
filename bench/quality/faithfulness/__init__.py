"""Faithfulness benchmark: the PA-LRP paper's token-flipping protocol on real text.

Run ``python -m bench.quality.faithfulness --help``; results and method notes in
docs/faithfulness.md. The protocol, tasks and methods are ``references/faithfulness/``.
"""
