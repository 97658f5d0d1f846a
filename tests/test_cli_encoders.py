"""``pelrp explain`` on encoders (--similarity, --dimension, --label with --text-pair) and on
GPT-2, on tiny checkpoints with tokenizers (built as in tests/test_encoders.py): the --json output
is an ``Explanation`` equal to the offline API's, and bad flag combinations are one error line
that names what is allowed."""

from __future__ import annotations

import pytest

from test_encoders import OTHER, TEXT, _pair_tokenizer, _sentence_dir
from test_render import assert_self_contained, embedded_explanation
from tiny_additive import save_tiny_additive, tiny_config
from tiny_models import tiny_tokenizer
from vllm_pelrp import cli, load_explainer
from vllm_pelrp.explanation import Explanation


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """A sentence-transformers BERT (mean pooling, normalised), a BERT cross-encoder (labels
    neg/neutral/pos, text pairs) and a GPT-2, each with a tokenizer."""
    root = tmp_path_factory.mktemp("cli-encoders")
    st, cls, gpt2 = root / "tiny-st-bert", root / "tiny-bert-cls", root / "tiny-gpt2"
    for directory in (st, cls, gpt2):
        directory.mkdir()
    save_tiny_additive("bert", st)
    tiny_tokenizer(tiny_config("bert").vocab_size).save_pretrained(st)
    _sentence_dir(st, "mean", True)
    save_tiny_additive("bert_cls", cls)
    _pair_tokenizer(tiny_config("bert_cls").vocab_size).save_pretrained(cls)
    save_tiny_additive("gpt2", gpt2)
    tiny_tokenizer(tiny_config("gpt2").vocab_size).save_pretrained(gpt2)
    return {"encoder": str(st), "classifier": str(cls), "gpt2": str(gpt2)}


def _json_of(argv, capsys) -> Explanation:
    assert cli.main(argv) == 0, capsys.readouterr().err
    return Explanation.model_validate_json(capsys.readouterr().out)


def _error_of(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    return " ".join(err.split())


def test_similarity_json_equals_the_offline_api(checkpoints, capsys):
    model = checkpoints["encoder"]
    wire = _json_of(["explain", "--model", model, TEXT, "--similarity", OTHER, "--json"], capsys)
    offline = load_explainer(model).explain(TEXT, target={"similarity": OTHER})
    assert wire == offline
    assert wire.target.kind == "similarity" and wire.other is not None
    assert [p.name for p in wire.positional_parts] == ["position_embedding"]
    # attnlrp and a combination go through as for decoders
    attn = _json_of(["explain", "--model", model, TEXT, "--similarity", OTHER, "--mode", "attnlrp",
                     "--combination", "abs-single", "--json"], capsys)
    assert attn == load_explainer(model).explain(TEXT, target={"similarity": OTHER},
                                                 mode="attnlrp", combination="abs-single")


def test_dimension_writes_json_and_html_and_prints_the_target(checkpoints, capsys, tmp_path):
    model = checkpoints["encoder"]
    json_path, html_path = tmp_path / "dim.json", tmp_path / "dim.html"
    assert cli.main(["explain", "--model", model, TEXT, "--dimension", "5", "--json",
                     str(json_path), "--html", str(html_path), "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    wire = Explanation.model_validate_json(json_path.read_text())
    assert wire == load_explainer(model).explain(TEXT, target={"dimension": 5})
    assert "target value" in out and "dimension 5" in out
    assert "learned position table" in out
    page = html_path.read_text()  # the web view's drawing of it: tests/test_webview.py
    assert_self_contained(page)
    assert embedded_explanation(page) == wire and 'data-top-k="3"' in page


def test_similarity_terminal_and_html_show_both_texts(checkpoints, capsys, tmp_path):
    html_path = tmp_path / "sim.html"
    assert cli.main(["explain", "--model", checkpoints["encoder"], TEXT, "--similarity", OTHER,
                     "--html", str(html_path)]) == 0
    out = capsys.readouterr().out
    assert out.index("query") < out.index("document") and "cosine" in out
    page = html_path.read_text()
    assert_self_contained(page)
    drawn = embedded_explanation(page)
    assert drawn.target.kind == "similarity" and drawn.other is not None
    assert "cosine" in drawn.target.description


def test_label_with_a_text_pair_equals_the_offline_api(checkpoints, capsys):
    model = checkpoints["classifier"]
    wire = _json_of(["explain", "--model", model, TEXT, "--text-pair", OTHER, "--label", "2",
                     "--json"], capsys)
    assert wire == load_explainer(model).explain(TEXT, text_pair=OTHER, target={"label": 2})
    by_name = _json_of(["explain", "--model", model, TEXT, "--label", "neutral", "--json"], capsys)
    assert by_name.target.label == 1
    assert "allowed" in _error_of(["explain", "--model", model, TEXT, "--label", "9"], capsys)


def test_gpt2_through_the_decoder_path(checkpoints, capsys):
    model = checkpoints["gpt2"]
    wire = _json_of(["explain", "--model", model, TEXT, "--max-new-tokens", "0", "--no-chat",
                     "--json"], capsys)
    assert wire == load_explainer(model).explain(TEXT, target="next")
    assert [p.name for p in wire.positional_parts] == ["position_embedding"]
    err = _error_of(["explain", "--model", model, TEXT, "--similarity", OTHER], capsys)
    assert "--similarity is for encoders" in err and "--target next | completion" in err


def test_encoder_without_a_target_or_with_decoder_flags(checkpoints, capsys):
    model = checkpoints["encoder"]
    err = _error_of(["explain", "--model", model, TEXT], capsys)
    assert "is an encoder" in err and "--similarity TEXT, --dimension K or --label I" in err
    err = _error_of(["explain", "--model", model, TEXT, "--completion", "w3"], capsys)
    assert "is an encoder" in err


@pytest.mark.parametrize(("argv", "says"), [
    (["x", "--similarity", "y", "--dimension", "1"], "one encoder target, not --similarity and"),
    (["x", "--similarity", "y", "--completion", "z"], "--completion is for causal LMs"),
    (["x", "--dimension", "0", "--target", "next", "--per-layer"],
     "--target, --per-layer are for causal LMs"),
    (["x", "--label", "1", "--max-new-tokens", "4"], "--max-new-tokens is for causal LMs"),
    (["x", "--text-pair", "y"], "--text-pair is a cross-encoder's second text"),
    (["x", "--similarity", "y", "--text-pair", "z"], "--text-pair is a cross-encoder's second"),
    (["x", "--label", "-1"], "label index >= 0"),
    (["x", "--dimension", "k"], "non-negative integer"),
])
def test_bad_combinations_exit_2_without_loading(argv, says, capsys, monkeypatch):
    def boom(**kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("model loaded")

    monkeypatch.setattr(cli, "load_explainer", boom)
    err = _error_of(["explain", *argv], capsys)
    assert says in err
    if "causal LMs" in says or "encoder target" in says:
        assert "--similarity TEXT, --dimension K or --label I" in err
