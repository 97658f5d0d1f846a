"""Grounding benchmark: PA-LRP source attribution against ContextCite on Debian package
descriptions. Run ``python -m bench.grounding --help``; method notes in
docs/grounding-benchmark.md."""
