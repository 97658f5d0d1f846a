"""Rendering (terminal + the HTML page's assembly) and CLI argument parsing, on a synthetic
Explanation (no model). The HTML page is drawn by the web view's script: what it draws is checked
in a browser, offline, by tests/test_webview.py."""

from __future__ import annotations

import ast
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console

import torch

from vllm_pelrp import cli
from vllm_pelrp.assemble import build_explanation, combine_relevance
from vllm_pelrp.targets import resolve_targets
from vllm_pelrp.engine.driver import RelevanceResult
from vllm_pelrp.explanation import (
    WIRE_FORMAT_VERSION,
    Conservation,
    Explanation,
    Grounding,
    LayerPositionalRelevance,
    PositionalPart,
    RelevanceRow,
    ResolvedTarget,
    SentenceSupport,
    SourceRelevance,
    Token,
)
from vllm_pelrp.html_page import STATIC_DIR, explanation_page
from vllm_pelrp.terminal import display_token, format_number, format_share, print_explanation

PROMPT_PIECES = ["<|im_start|>", "user", "\n", "if a < b", " & c", "</script>", "<|im_end|>\n"]
COMPLETION_PIECES = [" Paris", " <b>bold</b>", "\n\n", "."]
N_LAYERS = 3


def _normalise(values):
    top = max(abs(v) for v in values) or 1.0
    return [v / top for v in values]


def _row(target, token, positional, per_layer=None, parts=None):
    combined = _normalise(
        [t + sum(abs(c) + abs(s) for c, s in zip(
            [lr.cos[i] for lr in per_layer], [lr.sin[i] for lr in per_layer]))
         if per_layer else t + abs(p) for i, (t, p) in enumerate(zip(token, positional))]
    )
    logit = sum(token) + sum(positional) + 0.01
    return dict(
        target=target,
        target_logit=logit,
        token_relevance=token,
        positional_relevance=positional,
        positional_parts=parts,
        positional_relevance_per_layer=per_layer,
        combined_relevance=combined,
        conservation=Conservation(
            target_logit=logit,
            token_sum=sum(token),
            positional_sum=sum(positional),
            relative_error=0.01 / abs(logit),
            softmax_absorbed=0.5,
            bias_absorbed=0.25,
            relative_error_excluding_softmax=0.002,
        ),
    )


def make_explanation(*, per_layer: bool = True, rows: bool = True) -> Explanation:
    pieces = PROMPT_PIECES + COMPLETION_PIECES
    tokens, text, offset = [], "", 0
    for i, piece in enumerate(pieces):
        role = "prompt" if i < len(PROMPT_PIECES) else "completion"
        tokens.append(Token(index=i, id=100 + i, text=piece, start=offset, end=offset + len(piece),
                            role=role))
        text += piece
        offset += len(piece)
    n = len(tokens)
    token_rel = [0.5 * ((-1) ** i) * (i + 1) / n for i in range(n)]
    token_rel[5] = 2.0  # "</script>" is the most relevant token
    layers = [
        LayerPositionalRelevance(
            layer=layer,
            cos=[0.01 * (layer + 1) * ((-1) ** i) for i in range(n)],
            sin=[0.005 * (layer + 1) for _ in range(n)],
        )
        for layer in range(N_LAYERS)
    ]
    positional = [sum(lr.cos[i] + lr.sin[i] for lr in layers) for i in range(n)]
    parts = [PositionalPart(name=f"rope_{which}", kind="rotary",
                            relevance=[sum(getattr(lr, which)[i] for lr in layers) for i in range(n)])
             for which in ("cos", "sin")]
    p = len(PROMPT_PIECES)
    top = _row(
        ResolvedTarget(kind="completion", description="completion tokens 0:4",
                       positions=[p - 1, p, p + 1, p + 2], token_ids=[100 + p + k for k in range(4)],
                       span=(0, 4)),
        token_rel, positional, layers if per_layer else None, parts,
    )
    row_list = None
    if rows:
        row_list = []
        for k in range(len(COMPLETION_PIECES)):
            pos = p - 1 + k
            tok = [v if i <= pos else 0.0 for i, v in enumerate(token_rel)]
            posr = [v if i <= pos else 0.0 for i, v in enumerate(positional)]
            row_parts = [PositionalPart(name=part.name, kind=part.kind, relevance=[
                v if i <= pos else 0.0 for i, v in enumerate(part.relevance)]) for part in parts]
            target = ResolvedTarget(kind="per_token_row", description=f"completion token {k}",
                                    positions=[pos], token_ids=[100 + p + k], span=(k, k + 1))
            row_list.append(RelevanceRow(**_row(target, tok, posr, parts=row_parts)))
    return Explanation(
        wire_format_version=WIRE_FORMAT_VERSION,
        model="test-model <&>",
        mode="pa-lrp",
        text=text,
        prompt_length=p,
        tokens=tokens,
        rows=row_list,
        **top,
    )


# --- terminal -------------------------------------------------------------------------------
def _render(explanation, **kwargs) -> str:
    console = Console(record=True, width=100, color_system="truecolor", force_terminal=True)
    print_explanation(explanation, console, **kwargs)
    return console.export_text()


def test_print_explanation_contains_tokens_and_summary():
    ex = make_explanation()
    out = _render(ex)
    for piece in PROMPT_PIECES + COMPLETION_PIECES:
        for line in display_token(piece).split("\n"):
            assert line in out, line
    assert "⏎" in out
    assert "completion" in out and "prompt" in out
    c = ex.conservation
    for number in (ex.target_logit, c.token_sum, c.positional_sum, c.relative_error):
        assert format_number(number) in out
    assert format_share(ex.positional_share) in out
    assert ex.mode in out
    assert ex.target.description in out
    # Top-k table lists the most relevant token with its token relevance.
    assert format_number(ex.token_relevance[5]) in out


def test_print_explanation_per_layer_and_rows():
    ex = make_explanation()
    out = _render(ex)
    assert "per layer" in out
    assert "Σ|cos|" in out and "Σ|sin|" in out
    layer = ex.positional_relevance_per_layer[-1]
    assert format_number(sum(abs(v) for v in layer.cos)) in out
    assert "per-token targets" in out
    assert "Paris" in out


def test_print_explanation_fields_and_minimal():
    ex = make_explanation(per_layer=False, rows=False)
    for field in ("token", "positional_relevance", "combined"):
        out = _render(ex, field=field, top_k=3)
        assert "per layer" not in out and "per-token targets" not in out
    with pytest.raises(ValueError):
        _render(ex, field="nonsense")
    # Also fine without a colour terminal and through the model's convenience method.
    console = Console(record=True, width=100)
    ex.print(console=console)
    assert "Paris" in console.export_text()


def test_display_token():
    assert display_token("a\nb") == "a⏎\nb"
    assert display_token("\r\n") == "⏎\n"
    assert display_token("\t") == "⇥"
    assert display_token("") == "∅"
    assert display_token("\x00") == "\\x00"


# --- HTML -----------------------------------------------------------------------------------
SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # a name in the script, not a request


class _Collector(HTMLParser):
    """The page's URLs (src / href), its elements' ids and the text of its <script> / <style>."""

    def __init__(self):
        super().__init__()
        self.urls, self.ids, self.scripts, self.styles = [], [], [], []
        self._in = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs:
                self.urls.append(attrs[key])
        if attrs.get("id"):
            self.ids.append(attrs["id"])
        if tag in ("script", "style"):
            self._in = tag
            (self.scripts if tag == "script" else self.styles).append((attrs, ""))

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in:
            target = self.scripts if self._in == "script" else self.styles
            attrs, text = target[-1]
            target[-1] = (attrs, text + data)


def _embedded_json(page: str) -> str:
    match = re.search(r'<script type="application/json" id="explanation"[^>]*>(.*?)</script>',
                      page, re.S)
    assert match, "embedded JSON missing"
    return match.group(1)


def embedded_explanation(page: str) -> Explanation:
    """The explanation a page written by ``to_html`` draws (its embedded JSON)."""
    return Explanation.model_validate_json(_embedded_json(page))


def assert_self_contained(page: str) -> _Collector:
    """Nothing on the page is fetched: no src, no href but a data: URL, no host named but the SVG
    namespace, no @import; the web view's style and script are inlined, whole."""
    assert page.lower().startswith("<!doctype html>")
    parser = _Collector()
    parser.feed(page)
    assert all(url.startswith("data:") for url in parser.urls), parser.urls
    assert not re.search(r"\bsrc\s*=", page.split("<script", 1)[0], re.I)
    hosts = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}", page)) - {"http://www.w3.org"}
    assert not hosts, hosts
    assert page.count("http://") == page.count(SVG_NAMESPACE) and "https://" not in page
    assert "@import" not in page and "@font-face" not in page
    assert [text for _, text in parser.styles] == [
        "\n" + (STATIC_DIR / "pelrp.css").read_text(encoding="utf-8")]
    inline = [(attrs, text) for attrs, text in parser.scripts if attrs.get("type") is None]
    assert [text for _, text in inline] == [
        "\n" + (STATIC_DIR / "pelrp.js").read_text(encoding="utf-8")]
    assert not [attrs for attrs, _ in parser.scripts if "src" in attrs]
    # the elements the script draws into are on the page (index.html's own markup)
    for element_id in ("result", "heatmap", "positional-plot", "grounding", "source-bars",
                       "top-tokens", "layer-plot", "rows", "conservation", "tooltip"):
        assert element_id in parser.ids, element_id
    return parser


def test_html_is_self_contained_and_inlines_script_style_and_json():
    ex = make_explanation()
    page = ex.to_html()
    assert_self_contained(page)
    assert page == explanation_page(ex)
    assert page.count("</script>") == 2  # the JSON block and the script
    assert "<title>PA-LRP explanation · test-model &lt;&amp;&gt;</title>" in page
    # raw markup from tokens never reaches the page as markup: only inside the escaped JSON
    assert "<b>bold</b>" not in page and "</script>\"" not in page
    assert 'data-top-k="10"' in page and 'data-top-k="3"' in ex.to_html(top_k=3)
    with pytest.raises(ValueError, match="top_k"):
        ex.to_html(top_k=-1)


def test_html_embedded_json_round_trips():
    ex = make_explanation()
    payload = _embedded_json(ex.to_html())
    assert "</" not in payload and "<!--" not in payload
    assert Explanation.model_validate_json(payload) == ex
    assert json.loads(payload)["tokens"][5]["text"] == "</script>"


@pytest.mark.parametrize("name", ["minimal", "similarity", "grounded", "version 1"])
def test_html_of_each_kind_of_explanation_round_trips(name):
    if name == "minimal":
        ex = make_explanation(per_layer=False, rows=False)
    elif name == "similarity":
        ex = make_similarity()
    elif name == "grounded":
        ex = make_grounded()
    else:
        wire = json.loads(make_explanation().model_dump_json())
        del wire["wire_format_version"]
        for row in [wire, *wire["rows"]]:
            del row["positional_parts"]
        ex = Explanation.model_validate_json(json.dumps(wire))
    page = ex.to_html()
    assert_self_contained(page)
    assert Explanation.model_validate_json(_embedded_json(page)) == ex


def _runtime_imports(path: Path) -> set[str]:
    """Modules a file imports when it runs: every import but those under ``if TYPE_CHECKING:``
    (lazy imports inside functions count); relative imports as ``.name``."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
               and ast.unparse(branch.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
               for inner in branch.body for node in ast.walk(inner)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add("." * node.level + (node.module or ""))
    return found


def test_renderers_do_not_import_the_explanation_module():
    """The dependency goes one way: Explanation.to_html / .print import the renderers, which
    take the explanation as an argument and import nothing of the package at run time."""
    package = Path(__file__).parent.parent / "vllm_pelrp"
    for name in ("terminal.py", "html_page.py"):
        imports = _runtime_imports(package / name)
        assert not {m for m in imports if m.startswith(".") or m.startswith("vllm_pelrp")}, (
            name, imports)
    assert {".html_page", ".terminal"} <= _runtime_imports(package / "explanation.py")
    assert not (package / "render.py").exists()


# --- wire format ------------------------------------------------------------------------------
def _parts_sum(row) -> list[float]:
    return [sum(part.relevance[i] for part in row.positional_parts)
            for i in range(len(row.positional_relevance))]


def test_wire_format_round_trips_and_parts_sum_to_positional():
    ex = make_explanation()
    assert ex.wire_format_version == WIRE_FORMAT_VERSION == "2.1"
    assert Explanation.model_validate_json(ex.model_dump_json()) == ex
    for row in [ex, *ex.rows]:
        assert [(part.name, part.kind) for part in row.positional_parts] == [
            ("rope_cos", "rotary"), ("rope_sin", "rotary")]
        assert _parts_sum(row) == pytest.approx(row.positional_relevance, abs=1e-12)
    # Fields a later version adds are ignored by this one (the versioning policy).
    wire = json.loads(ex.model_dump_json())
    wire["a_field_from_version_2_1"] = [1, 2]
    wire["positional_parts"][0]["layers_from_later"] = None
    assert Explanation.model_validate_json(json.dumps(wire)) == ex


def test_version_1_json_still_validates_and_renders():
    ex = make_explanation()
    wire = json.loads(ex.model_dump_json())
    del wire["wire_format_version"]
    for row in [wire, *wire["rows"]]:
        del row["positional_parts"]
        del row["conservation"]["bias_absorbed"]
    old = Explanation.model_validate_json(json.dumps(wire))
    assert old.wire_format_version == "1"  # a document without the field is version 1
    assert old.positional_parts is None and all(row.positional_parts is None for row in old.rows)
    assert old.conservation.bias_absorbed == 0.0
    assert old.positional_relevance == ex.positional_relevance
    assert old.positional_relevance_per_layer == ex.positional_relevance_per_layer
    assert "Σ rope_cos" not in _render(old)
    assert Explanation.model_validate_json(_embedded_json(old.to_html())) == old


def test_positional_parts_rendered():
    ex = make_explanation()
    out = _render(ex)
    for part in ex.positional_parts:
        assert f"Σ {part.name}" in out and format_number(sum(part.relevance)) in out


def _fake_result(rows: int, length: int, rotary: bool, seed: int = 0) -> RelevanceResult:
    g = torch.Generator().manual_seed(seed)
    cos = torch.randn(rows, N_LAYERS, length, generator=g)
    sin = torch.randn(rows, N_LAYERS, length, generator=g)
    if not rotary:  # attnlrp / cp-lrp: the engine sends no relevance to cos/sin
        cos.zero_()
        sin.zero_()
    return RelevanceResult(torch.randn(rows, length, generator=g), cos, sin,
                           torch.randn(rows, generator=g), torch.rand(rows, N_LAYERS, generator=g))


@pytest.mark.parametrize("mode", ["pa-lrp", "attnlrp", "cp-lrp"])
def test_build_explanation_fills_positional_parts(mode):
    base = make_explanation()
    ids, p = [t.id for t in base.tokens], base.prompt_length
    targets = resolve_targets("per_token", p, ids[p:], vocab_size=1000)
    result = _fake_result(len(targets), len(ids), rotary=mode == "pa-lrp")
    ex = build_explanation(result, targets, ids, p, None, model="m", mode=mode, per_layer=True,
                           per_token=True, spans=(base.text, base.tokens))
    assert ex.wire_format_version == WIRE_FORMAT_VERSION
    assert Explanation.model_validate_json(ex.model_dump_json()) == ex
    cos, sin = result.positional_cos, result.positional_sin
    for row in [ex, *ex.rows]:
        assert len(row.positional_relevance_per_layer) == N_LAYERS  # as in version 1
        if mode == "pa-lrp":
            assert [part.name for part in row.positional_parts] == ["rope_cos", "rope_sin"]
            assert _parts_sum(row) == pytest.approx(row.positional_relevance, abs=1e-5)
            for part, which in zip(row.positional_parts, ("cos", "sin")):
                per_layer = [getattr(layer, which) for layer in row.positional_relevance_per_layer]
                assert part.relevance == pytest.approx([sum(c) for c in zip(*per_layer)], abs=1e-5)
        else:  # cos/sin are constants in these modes: no parts, not parts of zeros
            assert row.positional_parts == []
            assert row.positional_relevance == [0.0] * len(ids)
    # The numbers of wire format 1: positional = Σ_l (cos + sin), combined as combine_relevance.
    assert ex.positional_relevance == (cos.sum(0) + sin.sum(0)).sum(0).tolist()
    assert ex.combined_relevance == combine_relevance(result.token.sum(0), cos.sum(0),
                                                      sin.sum(0)).tolist()
    assert ex.rows[1].combined_relevance == combine_relevance(result.token[1], cos[1], sin[1]).tolist()


def test_relevance_row_takes_an_additive_part():
    from vllm_pelrp.assemble import PositionalInput, combine_parts, relevance_row, rotary_parts

    result = _fake_result(1, 6, rotary=True)
    token, cos, sin = result.token[0], result.positional_cos[0], result.positional_sin[0]
    table = torch.linspace(-1.0, 1.0, 6)
    parts = {**rotary_parts(cos, sin), "position_embedding": PositionalInput("learned", table)}
    target = ResolvedTarget(kind="next", description="next", positions=[5], token_ids=[1])
    row = relevance_row(target, token, cos, sin, 2.0, 0.0, False, parts=parts)
    assert [(part.name, part.kind) for part in row.positional_parts] == [
        ("rope_cos", "rotary"), ("rope_sin", "rotary"), ("position_embedding", "learned")]
    assert row.positional_parts[2].relevance == table.tolist()
    assert _parts_sum(row) == pytest.approx(row.positional_relevance, abs=1e-5)
    assert row.conservation.positional_sum == pytest.approx(sum(row.positional_relevance), abs=1e-5)
    assert row.combined_relevance == combine_parts(token, [*cos, *sin, table]).tolist()
    with pytest.raises(ValueError, match="kind"):
        PositionalInput("relative", table)


# --- CLI ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("next", "next"),
        ("completion", "completion"),
        ("per_token", "per_token"),
        ("per-token", "per_token"),
        ("span:1:3", {"span": [1, 3]}),
        ("span:0:1", {"span": [0, 1]}),
        ("token:42", {"token_id": 42}),
    ],
)
def test_parse_target(value, expected):
    assert cli.parse_target(value) == expected


@pytest.mark.parametrize("value", ["span:3:1", "span:1", "span:a:b", "span:1:2:3", "token:x",
                                   "token:-1", "tokens", "last", "span:-1:2", ""])
def test_parse_target_rejects(value):
    with pytest.raises(ValueError, match="target"):
        cli.parse_target(value)


def test_parser_target_and_defaults():
    args = cli.build_parser().parse_args(["explain", "hi", "--target", "span:1:3"])
    assert args.target == {"span": [1, 3]}
    args = cli.build_parser().parse_args(["explain", "hi", "--target", "token:42", "--json"])
    assert args.target == {"token_id": 42} and args.json == "-"
    args = cli.build_parser().parse_args(["explain", "hi"])
    assert args.target is None and args.max_new_tokens == 32 and args.mode == "pa-lrp"
    assert args.json is None and args.dtype == "float32" and not args.per_layer


@pytest.mark.parametrize(
    "argv",
    [
        ["explain", "hi", "--target", "span:a:b"],
        ["explain", "hi", "--target", "token:x"],
        ["explain", "hi", "--mode", "gradcam"],
        ["explain", "hi", "--dtype", "int8"],
        ["explain", "hi", "--max-new-tokens", "-1"],
        ["explain"],  # no prompt
        ["explain", "hi", "--max-new-tokens", "0", "--target", "completion"],
        [],
    ],
)
def test_cli_errors_exit_2_without_loading(argv, capsys, monkeypatch):
    def boom(**kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("model loaded")

    monkeypatch.setattr(cli, "load_explainer", boom)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert "Traceback" not in err


class _FakeExplainer:
    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self.calls = {}

    def encode_prompt(self, text=None, *, messages=None, chat=None):
        self.calls["prompt"] = (text, messages, chat)
        return [100 + i for i in range(len(PROMPT_PIECES))]

    def generate(self, prompt_ids, max_new_tokens=32):
        self.calls["generate"] = max_new_tokens
        return [100 + len(PROMPT_PIECES) + k for k in range(len(COMPLETION_PIECES))]

    def encode_completion(self, text):
        self.calls["completion"] = text
        return self.generate([], 4)

    def explain(self, *, input_ids, completion, target, mode, per_layer, combination):
        self.calls["explain"] = dict(target=target, mode=mode, per_layer=per_layer,
                                     completion=completion, combination=combination)
        if self.fail:
            raise self.fail
        return make_explanation()


def test_cli_explain_with_fake_explainer(tmp_path, capsys, monkeypatch):
    fake = _FakeExplainer()
    monkeypatch.setattr(cli, "load_explainer", lambda **kw: fake)
    html_path, json_path = tmp_path / "out.html", tmp_path / "out.json"
    code = cli.main(["explain", "hello", "--per-layer", "--html", str(html_path),
                     "--json", str(json_path), "--no-chat"])
    assert code == 0
    assert fake.calls["explain"]["target"] == "completion"
    assert fake.calls["explain"]["per_layer"] is True
    assert fake.calls["prompt"] == ("hello", None, False)
    assert Explanation.model_validate_json(json_path.read_text()) == make_explanation()
    page = html_path.read_text()
    assert_self_contained(page)
    assert Explanation.model_validate_json(_embedded_json(page)) == make_explanation()
    assert "Paris" in capsys.readouterr().out

    # --json to stdout prints only the JSON; next-token default without a completion.
    assert cli.main(["explain", "hello", "--max-new-tokens", "0", "--json"]) == 0
    assert fake.calls["explain"]["target"] == "next"
    assert Explanation.model_validate_json(capsys.readouterr().out) == make_explanation()


def test_cli_messages_json(tmp_path, capsys, monkeypatch):
    fake = _FakeExplainer()
    monkeypatch.setattr(cli, "load_explainer", lambda **kw: fake)
    path = tmp_path / "chat.json"
    messages = [{"role": "user", "content": "hi"}]
    path.write_text(json.dumps({"messages": messages}))
    assert cli.main(["explain", "--messages-json", str(path), "--completion", "Paris",
                     "--target", "per_token", "--json"]) == 0
    assert fake.calls["prompt"] == (None, messages, None)
    assert fake.calls["completion"] == "Paris"
    assert fake.calls["explain"]["target"] == "per_token"
    capsys.readouterr()
    path.write_text("[1, 2]")
    assert cli.main(["explain", "--messages-json", str(path)]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("exc", [ValueError("unsupported architecture 'GPT2LMHeadModel'"),
                                 FileNotFoundError("no checkpoint at /nope")])
def test_cli_api_errors_are_one_line(exc, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_explainer", lambda **kw: _FakeExplainer(fail=exc))
    assert cli.main(["explain", "hello", "--completion", "x"]) == 2
    err = capsys.readouterr().err
    assert str(exc) in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


# --- encoders and additive position tables (wire format 2.1) ---------------------------------
QUERY_PIECES = ["[CLS]", " the", " cat", " sits", " on", " the", " mat", ".", "[SEP]"]
DOCUMENT_PIECES = ["[CLS]", " a", " fe", "line", " rests", " on", " a", " rug", ".", "[SEP]"]


def _tokens(pieces, prompt_length=None):
    tokens, offset = [], 0
    prompt_length = len(pieces) if prompt_length is None else prompt_length
    for i, piece in enumerate(pieces):
        tokens.append(Token(index=i, id=200 + i, text=piece, start=offset, end=offset + len(piece),
                            role="prompt" if i < prompt_length else "completion"))
        offset += len(piece)
    return "".join(pieces), tokens


def make_additive_explanation(pieces, target, *, seed=0, token_types=True, kind="learned",
                              prompt_length=None, logit=None) -> Explanation:
    """An explanation of a model whose positions are one additive table (BERT, GPT-2): a
    ``position_embedding`` part, token-type relevance for BERT, conserving ``logit``."""
    text, tokens = _tokens(pieces, prompt_length)
    n = len(tokens)
    g = torch.Generator().manual_seed(seed)
    token = (torch.randn(n, generator=g) * 0.05).tolist()
    table = (torch.randn(n, generator=g) * 0.01).tolist()
    types = (torch.rand(n, generator=g) * 0.004).tolist() if token_types else None
    logit = logit if logit is not None else sum(token) + sum(table) + sum(types or []) + 0.02
    combined = _normalise([t + p for t, p in zip(token, table)])
    return Explanation(
        wire_format_version=WIRE_FORMAT_VERSION, model="all-MiniLM-L6-v2", mode="pa-lrp",
        text=text, prompt_length=len(pieces) if prompt_length is None else prompt_length,
        tokens=tokens, target=target, target_logit=logit, token_relevance=token,
        positional_relevance=table,
        positional_parts=[PositionalPart(name="position_embedding", kind=kind, relevance=table)],
        token_type_relevance=types, combined_relevance=combined,
        conservation=Conservation(
            target_logit=logit, token_sum=sum(token), positional_sum=sum(table),
            token_type_sum=sum(types or []), relative_error=0.02 / abs(logit),
            softmax_absorbed=0.015, bias_absorbed=0.005, relative_error_excluding_softmax=3e-8))


COSINE = 0.558404


def make_similarity() -> Explanation:
    def target(which):
        return ResolvedTarget(kind="similarity", positions=[], token_ids=[], value=COSINE,
                              description=f"cosine similarity {COSINE:.4f} of the two texts' pooled "
                              f"embeddings; {which} explains half of it (norms held, uniform rule)")
    other = make_additive_explanation(DOCUMENT_PIECES, target("the other text"), seed=1,
                                      logit=COSINE / 2)
    main = make_additive_explanation(QUERY_PIECES, target("this text"), logit=COSINE / 2)
    return main.model_copy(update={"other": other})


def test_position_table_and_token_types_are_labelled():
    ex = make_similarity()
    out = _render(ex)
    assert "learned position table" in out
    assert "RoPE" not in out and "rope_cos" not in out
    assert "Σ token-type relevance" in out and "token-type rel." in out
    assert format_number(ex.conservation.token_type_sum) in out
    absolute = make_additive_explanation(QUERY_PIECES, ex.target, kind="absolute",
                                         token_types=False)
    out = _render(absolute)
    assert "absolute position table" in out and "token-type" not in out


def test_rich_similarity_prints_query_then_document_with_the_target_value():
    ex = make_similarity()
    out = _render(ex, top_k=3)
    assert f"cosine {format_number(COSINE)}" in out
    assert "this side explains half" in " ".join(out.split())
    assert out.index("query") < out.index("document")
    # each text's heatmap, under its own label
    query_at, document_at = out.index("the cat sits"), out.index("a feline rests")
    assert query_at < document_at
    assert "prompt" not in out and "completion" not in out  # an encoder has input only
    assert f"{len(ex.tokens)} input" in out and f"{len(ex.other.tokens)} input" in out
    assert out.count(format_number(COSINE / 2)) >= 2


def test_dimension_and_label_targets_render():
    target = ResolvedTarget(kind="dimension", positions=[], token_ids=[], dimension=3, value=0.2431,
                            description="dimension 3 of the pooled embedding (before "
                                        "normalisation): 0.2431")
    ex = make_additive_explanation(QUERY_PIECES, target, logit=0.2431)
    out = _render(ex)
    assert "target value" in out and "0.2431" in out and "dimension 3" in out
    label = ResolvedTarget(kind="label", positions=[], token_ids=[], label=1, value=-1.25,
                           description="logit of label 1 ('entailment'): -1.2500")
    ex = make_additive_explanation(QUERY_PIECES, label, logit=-1.25)
    assert "'entailment'" in _render(ex) and "-1.2500" in _render(ex)


def make_gpt2() -> Explanation:
    """A causal LM with an additive table (GPT-2): prompt and completion as for RoPE models."""
    pieces = ["The", " capital", " of", " Italy", " is", " Rome", "."]
    target = ResolvedTarget(kind="completion", description="sum of the logits of completion "
                            "tokens [0, 2)", positions=[4, 5], token_ids=[205, 206], span=(0, 2))
    ex = make_additive_explanation(pieces, target, token_types=False, prompt_length=5)
    return ex.model_copy(update={"model": "gpt2"})


def make_grounded() -> Explanation:
    """``make_explanation`` with two declared sources (prompt tokens 1–3 and 3–5) and a grounding
    of its completion, one sentence supported by the first source."""
    ex = make_explanation(rows=False)
    sources = []
    for k, (start, end) in enumerate(((1, 3), (3, 5))):
        token = sum(ex.token_relevance[start:end])
        positional = sum(ex.positional_relevance[start:end])
        sources.append(SourceRelevance(
            index=k, name=f"document {k + 1}", kind="document", token_start=start,
            token_end=end, char_start=ex.tokens[start].start, char_end=ex.tokens[end - 1].end,
            token_relevance=token, positional_relevance=positional, share=0.3 - 0.1 * k,
            token_share=0.25 - 0.1 * k, positional_share=0.05))
    sentence = SentenceSupport(
        index=0, text=" Paris <b>bold</b>", span=(0, 2), char_start=ex.tokens[7].start,
        char_end=ex.tokens[8].end, target_logit=1.5, source_shares=[0.3, 0.2],
        source_relevance=[0.4, -0.1], supporting_sources=[0], grounding_score=0.5)
    grounding = Grounding(sources=sources, grounding_score=0.5, instruction_share=0.4,
                          positional_share=0.1, threshold=0.3, low_grounding=False,
                          supporting_sources=[0], sentences=[sentence])
    return ex.model_copy(update={"grounding": grounding})


def test_gpt2_explanation_prints_its_position_table():
    ex = make_gpt2()
    out = _render(ex)
    assert "5 prompt + 2 completion" in out and "completion" in out
    assert "Σ position_embedding" in out and "RoPE" not in out


def test_grounding_prints_sources_and_sentences():
    ex = make_grounded()
    out = _render(ex)
    assert "grounding score 50.0%" in out and "grounded (threshold 30.0%)" in out
    assert "document 1" in out and "document 2" in out and "outside: positions" in out
    assert "Paris <b>bold</b>" in out
