"""Grounding benchmark: PA-LRP source attribution against ContextCite on Debian package
descriptions. Run ``python -m bench.quality.grounding --help``; method notes in
docs/grounding-benchmark.md. The cases and the per-case measurement are ``references/grounding/``."""
