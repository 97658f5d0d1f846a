"""The wire format cannot drift from its published schema: docs/explanation.schema.json is, byte
for byte, what the pydantic model ``Explanation`` generates. A change to the model (a field
added, a description edited) fails here until the file is regenerated with the command below
and committed with it."""

from __future__ import annotations

import json
from pathlib import Path

from vllm_pelrp.explanation import Explanation

SCHEMA = Path(__file__).resolve().parents[1] / "docs" / "explanation.schema.json"
REGENERATE = ('.venv/bin/python -c "import json; from vllm_pelrp.explanation import Explanation; '
              'print(json.dumps(Explanation.model_json_schema(), indent=2))" > docs/explanation.schema.json')


def generated() -> str:
    return json.dumps(Explanation.model_json_schema(), indent=2) + "\n"


def test_published_schema_is_the_models_schema():
    published = SCHEMA.read_text()
    assert json.loads(published) == Explanation.model_json_schema(), (
        f"docs/explanation.schema.json differs from Explanation.model_json_schema(); regenerate:\n"
        f"  {REGENERATE}")
    assert published == generated(), f"same schema, other formatting; regenerate:\n  {REGENERATE}"

