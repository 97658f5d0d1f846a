"""What the tests measure the package against, kept apart from the benchmarks so that a change
to a benchmark cannot break CI: the external references and the environments they run in
(LXT's AttnLRP: ``lxt_reference.py``, ``lxt_env.sh``; ContextCite: ``contextcite_worker.py``,
``contextcite_env.sh``, with ``venv_lib.sh`` that both source), Llama 3's RoPE configuration
(``llama3.py``), and the quality protocols with their data (``faithfulness/``,
``grounding/``). The benchmarks in ``bench/quality/`` drive these; nothing here imports bench."""
