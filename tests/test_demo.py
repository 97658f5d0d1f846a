"""The README's main command (``bash scripts/serve_demo.sh``) ends in ``scripts/demo.py``: an
explained chat completion through the OpenAI SDK, shown in the terminal and written as HTML.
Here the script itself runs, as a subprocess, against the session's shared test server
(tests/_live_server.py) instead of a server of its own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from vllm_pelrp import Explanation

from _live_server import API_KEY, MODEL, http, shared_server

# the first module to ask for the shared server (alphabetically) pays its start, up to 600 s
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Why is the sky blue? Answer in one sentence."  # the script's default


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    return shared_server(request.config, tmp_path_factory)


def test_the_demo_script_shows_and_writes_the_servers_explained_answer(server, tmp_path):
    html = tmp_path / "out" / "explanation.html"
    port = urlsplit(server).port
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--port", str(port), "--api-key",
         API_KEY, "--html", str(html), "--wait", "60"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the answer it shows is the model's greedy answer to the same prompt, asked directly
    plain = http.post(server + "/v1/chat/completions", timeout=600, json={
        "model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
        "temperature": 0})
    assert plain.status_code == 200, plain.text
    answer = plain.json()["choices"][0]["message"]["content"]
    assert answer.strip() and answer in result.stdout, (answer, result.stdout[-2000:])
    assert f"wrote {html}" in result.stdout
    page = html.read_text()
    assert page.lstrip().lower().startswith("<!doctype html") and "</html>" in page.lower()
    # the page draws the server's explanation of that answer (html_page.py embeds its JSON)
    embedded = re.search(r'<script type="application/json" id="explanation"[^>]*>(.*?)</script>',
                         page, re.S)
    assert embedded, "the page embeds no explanation"
    explanation = Explanation.model_validate_json(embedded.group(1))
    completion = "".join(t.text for t in explanation.tokens if t.role == "completion")
    assert answer.strip() in completion, (answer, completion)
    assert explanation.mode == "pa-lrp" and explanation.positional_relevance
