"""RAG grounding (vllm_pelrp/grounding.py): the template, source placement, sentence splitting,
the shares' bookkeeping, and the Python API on the real default model.

The model tests use two Debian package descriptions and a given two-sentence answer whose first
sentence quotes the first document and whose second quotes the second: each sentence's top
supporting source must be the document it quotes. Sentence rows run in the main target's batched
backward; each must equal the same span explained alone."""

from __future__ import annotations

import re

import pytest

from vllm_pelrp.explanation import Explanation, Token
from vllm_pelrp.grounding import (
    DEFAULT_GROUNDING_THRESHOLD,
    SentenceRelevance,
    SourceSpec,
    build_grounding,
    completion_sentences,
    locate_sources,
    parse_sources,
    render_documents,
    split_sentences,
)

DOCUMENTS = [
    "gcal: a program for calculating and printing calendars. Gcal displays calendar sheets and "
    "lists holidays.",
    "htop: interactive processes viewer. Htop is an ncurses-based process viewer similar to top.",
]
QUESTION = "Which package prints calendars, and which one shows processes?"
MESSAGES = [{"role": "user", "content": QUESTION}]
ANSWER = "The gcal package prints calendars. The htop package shows processes."


# ---- pure parts -------------------------------------------------------------------------------
def test_render_documents_spans_are_the_documents():
    text, spans = render_documents("Why?", ["first doc", "second doc"])
    assert [text[a:b] for a, b in spans] == ["first doc", "second doc"]
    assert text.startswith("Answer the question using the documents below.")
    assert "Document 1:\nfirst doc" in text and "Document 2:\nsecond doc" in text
    assert text.endswith("Question: Why?")
    with pytest.raises(ValueError, match="non-empty list"):
        render_documents("Why?", [])
    with pytest.raises(ValueError, match="document 2 is empty"):
        render_documents("Why?", ["a", "  "])


@pytest.mark.parametrize("text, expected", [
    ("One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
    ("Tools, e.g. gcal and cal. Next one.", ["Tools, e.g. gcal and cal.", "Next one."]),
    ("Version 3.5 is out.\nSecond line\n\n  Third.  ", ["Version 3.5 is out.", "Second line",
                                                        "Third."]),
    ('He said "yes." Then left.', ['He said "yes."', "Then left."]),
    ("   ", []),
])
def test_split_sentences(text, expected):
    assert [text[a:b] for a, b in split_sentences(text)] == expected


def _tokens(pieces: list[str], prompt_length: int, ids: list[int] | None = None) -> list[Token]:
    out, offset = [], 0
    for index, piece in enumerate(pieces):
        out.append(Token(index=index, id=(ids or [10 + i for i in range(len(pieces))])[index],
                         text=piece, start=offset, end=offset + len(piece),
                         role="prompt" if index < prompt_length else "completion"))
        offset += len(piece)
    return out


def test_completion_sentences_skip_special_tokens_and_attach_spaces():
    pieces = ["Q", ":", " A", ".", " B", " c", ".", " ", "<eos>"]
    tokens = _tokens(pieces, 2, ids=[10, 11, 12, 13, 14, 15, 16, 17, 2])
    sentences, truncated = completion_sentences("".join(pieces), tokens, 2, skip_token_ids=[2])
    assert [(s.text, s.span) for s in sentences] == [("A.", (0, 2)), ("B c.", (2, 6))]
    assert not truncated
    few, truncated = completion_sentences("".join(pieces), tokens, 2, [2], max_sentences=1)
    assert len(few) == 1 and truncated


def test_locate_sources_assigns_each_token_to_one_source():
    pieces = ["<s>", "doc", " one", "\n\n", "doc", " two", " ask"]
    text = "".join(pieces)
    tokens = _tokens(pieces, 7)
    specs = parse_sources([{"text": "doc one"}, {"chars": [text.index("doc two"), len(text) - 4],
                                                  "name": "second"}])
    first, second = locate_sources(text, tokens, 7, specs)
    assert (first.token_start, first.token_end, first.name, first.kind) == (1, 3, "span 1", "span")
    assert (second.token_start, second.token_end, second.name) == (4, 6, "second")
    with pytest.raises(ValueError, match="sources overlap"):
        locate_sources(text, tokens, 7, parse_sources([{"text": "doc one"}, {"text": "one"}]))
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        locate_sources(text, tokens, 7, parse_sources([{"text": "three"}]))
    with pytest.raises(ValueError, match="needs a chat prompt"):
        locate_sources(text, tokens, 7, parse_sources([{"message": 0}]))
    with pytest.raises(ValueError, match="reach beyond the prompt"):
        locate_sources(text, tokens, 7, parse_sources([{"chars": [0, 999]}]))


def test_message_spans_in_order_and_trimmed():
    from vllm_pelrp.grounding import message_spans

    text = "<s>system\nanswer\nuser\nanswer\nassistant\n"
    # the same content twice: each message is found after the one before it; a template that
    # trims contents (Llama 3) still matches
    spans = message_spans(text, len(text), ["answer", "  answer\n", None, ""])
    assert spans == [(10, 16), (22, 28), None, None]


def test_source_spec_validation_says_what_is_allowed():
    with pytest.raises(ValueError, match="needs message, text or chars"):
        parse_sources([{"name": "x"}])
    with pytest.raises(ValueError, match="text or chars, not both"):
        parse_sources([{"text": "a", "chars": [0, 1]}])
    with pytest.raises(ValueError, match="start < end"):
        parse_sources([{"chars": [3, 3]}])
    with pytest.raises(ValueError, match="doc: Extra inputs are not permitted; a source is"):
        parse_sources([{"doc": 1}])
    assert parse_sources([SourceSpec(message=1, chars=(0, 4))])[0].chars == (0, 4)


def test_shares_add_up_and_support_rule():
    pieces = ["a", "b", "c", "d", "e", "x"]
    tokens = _tokens(pieces, 5)
    sources = locate_sources("abcdex", tokens, 5, parse_sources([{"text": "b"}, {"text": "cd"}]))
    token = [1.0, -2.0, 3.0, 0.5, 1.0, 9.0]  # the completion position (x) is not prompt mass
    positional = [-1.0, 0.0, 1.0, 0.0, 0.5, 9.0]
    row = SentenceRelevance([0.0, 1.0, -4.0, 0.0, 0.0, 0.0], [0.0] * 6, 3.0)
    grounding = build_grounding(sources, token, positional, 5,
                                completion_sentences("abcdex", tokens, 5)[0], [row], 0.5)
    total = 1 + 2 + 3 + 0.5 + 1 + 1 + 1 + 0.5
    b, cd = grounding.sources
    assert b.share == pytest.approx(2 / total) and b.token_share == pytest.approx(2 / total)
    assert cd.share == pytest.approx(4.5 / total)
    assert cd.positional_share == pytest.approx(1 / total)
    assert (b.token_relevance, cd.token_relevance, cd.positional_relevance) == (-2.0, 3.5, 1.0)
    assert grounding.grounding_score == pytest.approx(6.5 / total)
    assert grounding.instruction_share == pytest.approx(2 / total)
    assert grounding.positional_share == pytest.approx(1.5 / total)
    assert grounding.low_grounding is False and grounding.threshold == 0.5
    # b's signed relevance is negative: it does not support the target, cd does
    assert grounding.supporting_sources == [1]
    (sentence,) = grounding.sentences
    assert sentence.source_shares == pytest.approx([0.2, 0.8])
    # cd holds 80 % of this sentence's mass but its signed relevance is negative; b's is
    # positive but its share is under half of cd's: no source supports the sentence
    assert sentence.source_relevance == [1.0, -4.0]
    assert sentence.supporting_sources == []
    assert sentence.grounding_score == pytest.approx(1.0)


def test_pelrp_serve_grounding_threshold_reaches_the_server(monkeypatch, tmp_path):
    from vllm_pelrp import cli
    from vllm_pelrp.grounding import grounding_threshold_from_env

    (tmp_path / "config.json").write_text("{}")
    args, unknown = cli.build_parser().parse_known_args(
        ["serve", "--model", str(tmp_path), "--grounding-threshold", "0.45"])
    args.vllm_args = unknown
    _, env = cli.serve_command(args)
    assert env["VLLM_PELRP_GROUNDING_THRESHOLD"] == "0.45"
    monkeypatch.setenv("VLLM_PELRP_GROUNDING_THRESHOLD", env["VLLM_PELRP_GROUNDING_THRESHOLD"])
    assert grounding_threshold_from_env() == 0.45
    monkeypatch.setenv("VLLM_PELRP_GROUNDING_THRESHOLD", "lots")
    with pytest.raises(ValueError, match="expected a number from 0 to 1"):
        grounding_threshold_from_env()
    monkeypatch.delenv("VLLM_PELRP_GROUNDING_THRESHOLD")
    assert grounding_threshold_from_env() == DEFAULT_GROUNDING_THRESHOLD
    assert cli.main(["serve", "--grounding-threshold", "1.5", "--dry-run"]) == 2


# ---- the real default model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def grounded(smollm2):
    return smollm2.explain(messages=MESSAGES, documents=DOCUMENTS, completion=ANSWER,
                           target="completion")


def test_documents_are_placed_in_the_last_user_message(smollm2, grounded):
    grounding = grounded.grounding
    assert [s.name for s in grounding.sources] == ["document 1", "document 2"]
    for source, document in zip(grounding.sources, DOCUMENTS):
        assert source.kind == "document"
        assert grounded.text[source.char_start:source.char_end] == document
        covered = "".join(t.text for t in grounded.tokens[source.token_start:source.token_end])
        assert document in covered and len(covered) <= len(document) + 2
        assert source.token_end <= grounded.prompt_length
    user_text = render_documents(QUESTION, DOCUMENTS)[0]
    assert user_text in grounded.text
    assert smollm2.encode_prompt(messages=MESSAGES, documents=DOCUMENTS) == [
        t.id for t in grounded.tokens[: grounded.prompt_length]]


def test_shares_partition_the_prompt_mass(grounded):
    grounding = grounded.grounding
    total = sum(s.share for s in grounding.sources) + grounding.instruction_share \
        + grounding.positional_share
    assert total == pytest.approx(1.0, abs=1e-9)
    mass = sum(abs(v) for v in grounded.token_relevance[: grounded.prompt_length]) + sum(
        abs(v) for v in grounded.positional_relevance[: grounded.prompt_length])
    for source in grounding.sources:
        a, b = source.token_start, source.token_end
        assert source.token_relevance == pytest.approx(sum(grounded.token_relevance[a:b]))
        assert source.token_share == pytest.approx(
            sum(abs(v) for v in grounded.token_relevance[a:b]) / mass)
        assert source.share == pytest.approx(source.token_share + source.positional_share)
    assert grounding.grounding_score == pytest.approx(sum(s.share for s in grounding.sources))
    assert 0.05 < grounding.grounding_score < 0.95


def test_each_sentence_is_supported_by_the_document_it_quotes(grounded):
    sentences = grounded.grounding.sentences
    assert [s.text for s in sentences] == ["The gcal package prints calendars.",
                                           "The htop package shows processes."]
    assert [s.supporting_sources[0] for s in sentences] == [0, 1]
    for sentence in sentences:
        assert sentence.source_shares[sentence.supporting_sources[0]] > 2 * min(
            sentence.source_shares)
        assert sentence.grounding_score == pytest.approx(sum(sentence.source_shares))


def test_sentence_rows_equal_spans_explained_alone(smollm2, grounded):
    plain = smollm2.explain(messages=MESSAGES, documents=DOCUMENTS, completion=ANSWER,
                            target="completion", sentences=False)
    assert plain.grounding.sentences == []
    assert plain.token_relevance == pytest.approx(grounded.token_relevance, rel=1e-4, abs=1e-5)
    assert plain.grounding.grounding_score == pytest.approx(grounded.grounding.grounding_score,
                                                            rel=1e-4)
    sentence = grounded.grounding.sentences[1]
    alone = smollm2.explain(messages=MESSAGES, documents=DOCUMENTS, completion=ANSWER,
                            target={"span": list(sentence.span)}, sentences=False)
    assert alone.target_logit == pytest.approx(sentence.target_logit, rel=1e-5)
    assert [s.share for s in alone.grounding.sources] == pytest.approx(sentence.source_shares,
                                                                       rel=1e-4)
    # sum of the sentence rows = the completion target (the backward is linear in its seed)
    assert sum(s.target_logit for s in grounded.grounding.sentences) == pytest.approx(
        grounded.target_logit, rel=1e-5)


def test_threshold_sets_low_grounding(smollm2, grounded):
    assert grounded.grounding.threshold == DEFAULT_GROUNDING_THRESHOLD
    high = smollm2.explain(messages=MESSAGES, documents=DOCUMENTS, completion=ANSWER,
                           target="completion", grounding_threshold=1.0, sentences=False)
    low = smollm2.explain(messages=MESSAGES, documents=DOCUMENTS, completion=ANSWER,
                          target="completion", grounding_threshold=0.0, sentences=False)
    assert high.grounding.low_grounding is True and low.grounding.low_grounding is False
    with pytest.raises(ValueError, match="out of range; allowed: 0 to 1"):
        smollm2.explain(messages=MESSAGES, documents=DOCUMENTS, completion=ANSWER,
                        grounding_threshold=1.5)


def test_message_text_and_chars_sources_agree(smollm2):
    messages = [{"role": "system", "content": "Notes: " + DOCUMENTS[0]},
                {"role": "user", "content": QUESTION}]
    by_message = smollm2.explain(messages=messages, completion=ANSWER, target="completion",
                                 sources=[{"message": 0, "name": "notes"}], sentences=False)
    (notes,) = by_message.grounding.sources
    assert (notes.name, notes.kind) == ("notes", "message")
    assert by_message.text[notes.char_start:notes.char_end] == messages[0]["content"]
    assert by_message.text.count(messages[0]["content"]) == 1
    by_text = smollm2.explain(messages=messages, completion=ANSWER, target="completion",
                              sources=[{"text": DOCUMENTS[0]}], sentences=False)
    start = by_message.text.index(DOCUMENTS[0])
    by_chars = smollm2.explain(messages=messages, completion=ANSWER, target="completion",
                               sources=[{"chars": [start, start + len(DOCUMENTS[0])]}],
                               sentences=False)
    inside = smollm2.explain(messages=messages, completion=ANSWER, target="completion",
                             sources=[{"message": 0, "chars": [7, 7 + len(DOCUMENTS[0])]}],
                             sentences=False)
    assert by_text.grounding.sources[0].char_start == start
    assert by_chars.grounding.sources[0] == by_text.grounding.sources[0]
    assert inside.grounding.sources[0].share == pytest.approx(by_text.grounding.sources[0].share)
    assert notes.share > by_text.grounding.sources[0].share  # "Notes: " adds tokens


def test_text_prompt_and_per_token_target(smollm2):
    explanation = smollm2.explain(QUESTION, documents=DOCUMENTS, completion=" gcal.",
                                  target="per_token")
    assert explanation.text.startswith(render_documents(QUESTION, DOCUMENTS)[0])
    assert len(explanation.rows) == len(explanation.tokens) - explanation.prompt_length
    (sentence,) = explanation.grounding.sentences
    assert sentence.text == "gcal." and sentence.span == (0, len(explanation.rows))
    assert sentence.target_logit == pytest.approx(explanation.target_logit, rel=1e-5)


def test_no_sources_no_grounding_and_clear_errors(smollm2):
    assert smollm2.explain(messages=MESSAGES, completion=ANSWER, target="completion").grounding \
        is None
    with pytest.raises(ValueError, match="with input_ids, mark the sources"):
        smollm2.explain(input_ids=[1, 2, 3], documents=DOCUMENTS)
    with pytest.raises(ValueError, match="message 3 does not exist"):
        smollm2.explain(messages=MESSAGES, completion=ANSWER, sources=[{"message": 3}])
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        smollm2.explain(messages=MESSAGES, completion=ANSWER, sources=[{"text": "zebra"}])
    with pytest.raises(ValueError, match="no message with role 'user'"):
        smollm2.explain(messages=[{"role": "system", "content": "x"}], documents=DOCUMENTS)


def test_grounding_renders_in_the_terminal_and_html(grounded):
    from rich.console import Console

    console = Console(record=True, width=140)
    grounded.print(console=console)
    text = console.export_text()
    score = f"{grounded.grounding.grounding_score:.1%}"
    assert f"grounding score {score}" in text
    assert "document 1" in text and "outside: positions" in text
    assert "The gcal package prints calendars." in text
    # the page is drawn by the web view's script from the embedded JSON (its drawing of the
    # grounding is checked in a browser by tests/test_webview.py)
    page = grounded.to_html()
    embedded = re.search(r'<script type="application/json" id="explanation"[^>]*>(.*?)</script>',
                         page, re.S).group(1)
    assert Explanation.model_validate_json(embedded).grounding == grounded.grounding
