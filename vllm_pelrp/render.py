"""Human-readable views of an :class:`~vllm_pelrp.explanation.Explanation`.

- :func:`print_explanation`: a coloured token heatmap plus summary tables in the terminal (rich).
- :func:`explanation_html`: a self-contained HTML page (inline CSS/JS/SVG, no network access),
  with the explanation JSON embedded in ``<script type="application/json" id="explanation">``.

Colours: red for positive relevance, blue for negative, white for zero; the intensity is
``|value| / max |value|`` over the tokens shown.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from .explanation import Explanation, RelevanceRow, Token

FIELDS: dict[str, str] = {
    "combined": "combined_relevance",
    "token": "token_relevance",
    "positional": "positional_relevance",
}
"""Short view names and the relevance field each one shows."""

POSITIVE_RGB = (220, 38, 38)
NEGATIVE_RGB = (37, 99, 235)
_WHITE = (255, 255, 255)
_SPARKS = "▁▂▃▄▅▆▇█"


# --- helpers --------------------------------------------------------------------------------
def resolve_field(field: str) -> str:
    """Accept ``combined`` / ``token`` / ``positional`` or the full ``*_relevance`` field name."""
    if field in FIELDS:
        return FIELDS[field]
    if field in FIELDS.values():
        return field
    choices = ", ".join(list(FIELDS) + list(FIELDS.values()))
    raise ValueError(f"unknown relevance field {field!r} (choose from {choices})")


def format_number(x: float | None) -> str:
    """Compact, fixed formatting used for every number shown (terminal and HTML)."""
    if x is None:
        return "n/a"
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a == 0:
        return "0"
    if 1e-3 <= a < 1e5:
        return f"{x:.4f}"
    return f"{x:.3e}"


def format_share(x: float) -> str:
    return f"{x:.1%}"


def _max_abs(values: Sequence[float]) -> float:
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    return max(finite, default=0.0)


def _intensity(value: float | None, max_abs: float) -> float:
    if value is None or not math.isfinite(value) or max_abs <= 0:
        return 0.0
    return min(1.0, abs(value) / max_abs)


def heat_rgb(value: float | None, max_abs: float) -> tuple[int, int, int]:
    """White -> red for positive values, white -> blue for negative ones."""
    t = _intensity(value, max_abs)
    base = NEGATIVE_RGB if (value or 0.0) < 0 else POSITIVE_RGB
    return tuple(round(w + (b - w) * t) for w, b in zip(_WHITE, base))  # type: ignore[return-value]


def _fg_for(value: float | None, max_abs: float) -> str:
    return "#ffffff" if _intensity(value, max_abs) > 0.55 else "#111111"


def display_token(text: str) -> str:
    """Token text made visible: newlines become ``⏎`` + a line break, tabs ``⇥``, other control
    characters ``\\xNN``; an empty token is shown as ``∅``."""
    if text == "":
        return "∅"
    out = []
    for ch in text.replace("\r\n", "\n"):
        if ch == "\n":
            out.append("⏎\n")
        elif ch == "\t":
            out.append("⇥")
        elif ch == "\r":
            out.append("↵")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def short_token(text: str, limit: int = 24) -> str:
    """One-line token text for tables (``repr``-like, without the quotes' escaping noise)."""
    shown = display_token(text).replace("\n", "")
    if len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return shown


def _sparkline(values: Sequence[float]) -> str:
    top = _max_abs(values)
    if top <= 0:
        return _SPARKS[0] * len(values)
    return "".join(_SPARKS[min(len(_SPARKS) - 1, int(abs(v) / top * (len(_SPARKS) - 1) + 0.5))]
                   for v in values)


def _row_target_token(explanation: Explanation, row: RelevanceRow) -> tuple[str, int | None]:
    """(text, id) of the token whose logit is the row's target."""
    target = row.target
    token_id = target.token_ids[0] if target.token_ids else None
    if target.span is not None:
        index = explanation.prompt_length + target.span[0]
        if 0 <= index < len(explanation.tokens) and explanation.tokens[index].id == token_id:
            return explanation.tokens[index].text, token_id
    for tok in explanation.tokens[explanation.prompt_length:]:
        if tok.id == token_id:
            return tok.text, token_id
    return f"<id {token_id}>", token_id


def _row_top_inputs(
    explanation: Explanation, row: RelevanceRow, field: str, k: int = 3
) -> list[tuple[Token, float]]:
    values = getattr(row, field)
    limit = max(row.target.positions, default=len(values) - 1) + 1  # inputs the target can see
    order = sorted(range(min(limit, len(values))), key=lambda i: -abs(values[i]))[:k]
    return [(explanation.tokens[i], values[i]) for i in order]


def _part_sums(explanation: Explanation, labelled: bool = False) -> list[tuple[str, float]]:
    """(name, Σ relevance) of each named positional part (wire format 2; none in version 1);
    ``labelled``: an additive table's name says what it is (``part_label``)."""
    return [(part_label(part.name, part.kind) if labelled else part.name, sum(part.relevance))
            for part in explanation.positional_parts or []]


def _encoder_target_pairs(explanation: Explanation) -> list[tuple[str, str]]:
    """The summary's first lines for an encoder target: its value, and for a similarity what
    this side's relevance conserves (half the cosine)."""
    target = explanation.target
    if target.kind == "similarity":
        return [("cosine", format_number(target.value)),
                ("this side explains", f"half: {format_number(explanation.target_logit)}")]
    return [("target value", format_number(explanation.target_logit))]


ENCODER_TARGETS = ("dimension", "similarity", "label")
"""``target.kind`` of an encoder explanation (wire format 2.1): all its tokens are input."""


def is_encoder(explanation: Explanation) -> bool:
    """An encoder explanation (embedding, similarity or classifier target): no completion."""
    return explanation.target.kind in ENCODER_TARGETS


def part_label(name: str, kind: str) -> str:
    """How a positional part is named on screen: rotary parts by name (rope_cos, rope_sin), the
    one additive table as what it is (``position_embedding (learned position table)``)."""
    return name if kind == "rotary" else f"{name} ({kind} position table)"


def target_summary(explanation: Explanation) -> str:
    """One line on the target. A similarity: its cosine and what this side's relevance conserves
    (``similarity: cosine 0.5584, this side explains half (0.2792)``); otherwise the
    description (a dimension's or label's value is in it)."""
    target = explanation.target
    if target.kind == "similarity":
        return (f"similarity: cosine {format_number(target.value)}, this side explains half "
                f"({format_number(explanation.target_logit)})")
    return target.description  # dimension / label: "… of the pooled embedding …: value"


def _layer_sums(explanation: Explanation) -> list[tuple[int, float, float]]:
    layers = explanation.positional_relevance_per_layer or []
    return [(lr.layer, sum(abs(v) for v in lr.cos), sum(abs(v) for v in lr.sin)) for lr in layers]


# --- terminal -------------------------------------------------------------------------------
def print_explanation(
    explanation: Explanation,
    console: Console | None = None,
    *,
    field: str = "combined_relevance",
    top_k: int = 10,
) -> None:
    """Print a token heatmap of ``field`` and summary tables to ``console`` (default: stdout).
    A similarity explanation (with ``other``) prints both texts, the query and then the
    document, each with its heatmap, summary and top tokens."""
    from rich.console import Console
    from rich.rule import Rule
    from rich.text import Text

    field = resolve_field(field)
    console = console or Console()
    if explanation.other is not None:  # a similarity: both texts, one after the other
        other = explanation.other
        head = Text()
        head.append("similarity  ", style="bold")
        head.append(f"cosine {format_number(explanation.target.value)}", style="bold")
        head.append(f" = query {format_number(explanation.target_logit)} + document "
                    f"{format_number(other.target_logit)}")
        head.append("  (each text explains half)", style="dim")
        console.print(head)
        for side, shown in (("query", explanation), ("document", other)):
            console.print(Rule(f"[bold]{side}[/bold]", style="cyan"))
            _print_one(shown, console, field, top_k, side)
        return
    _print_one(explanation, console, field, top_k, None)


def _print_one(explanation: Explanation, console: Console, field: str, top_k: int,
               side: str | None) -> None:
    """``print_explanation`` of one text; ``side``: 'query' / 'document' of a similarity."""
    from rich import box
    from rich.color import Color
    from rich.console import Group
    from rich.panel import Panel
    from rich.rule import Rule
    from rich.style import Style
    from rich.table import Table
    from rich.text import Text

    encoder = is_encoder(explanation)
    values = getattr(explanation, field)
    max_abs = _max_abs(values)
    view = next(k for k, v in FIELDS.items() if v == field)

    def heat_text(tokens: Sequence[Token]) -> Text:
        text = Text()
        for tok in tokens:
            value = values[tok.index] if tok.index < len(values) else None
            style = Style(
                bgcolor=Color.from_rgb(*heat_rgb(value, max_abs)),
                color=Color.parse(_fg_for(value, max_abs)),
            )
            shown = display_token(tok.text)
            # Style each visual line separately so the line break itself carries no background.
            parts = shown.split("\n")
            for j, part in enumerate(parts):
                if part:
                    text.append(part, style=style)
                if j < len(parts) - 1:
                    text.append("\n")
        if text.plain.endswith("\n"):  # the section break already ends the line
            text.right_crop(1)
        return text

    prompt = [t for t in explanation.tokens if t.role == "prompt"]
    completion = [t for t in explanation.tokens if t.role == "completion"]
    parts: list = [Text(side or ("input" if encoder else "prompt"), style="bold cyan"),
                   heat_text(prompt)]
    if completion:
        parts += [Rule("completion", style="magenta", characters="╌"), heat_text(completion)]
    legend = Text("  −max ")
    for t in (-1.0, -0.66, -0.33, 0.0, 0.33, 0.66, 1.0):
        legend.append("  ", style=Style(bgcolor=Color.from_rgb(*heat_rgb(t, 1.0))))
    legend.append(f" +max   (max |{view}| = {format_number(max_abs)})", style="dim")
    console.print(
        Panel(
            Group(*parts),
            title=f"[bold]{view} relevance[/bold]",
            subtitle=legend,
            border_style="grey50",
        )
    )

    # Summary.
    c = explanation.conservation
    # The softmax rule is not conservative by design (AttnLRP): judge the other rules' closure.
    closure = c.relative_error_excluding_softmax
    rel_style = "green" if closure <= 1e-3 else ("yellow" if closure <= 1e-2 else "red")
    head = Text()
    head.append("summary  ", style="bold")
    for j, (key, value) in enumerate((("model", explanation.model), ("mode", explanation.mode),
                                      ("target", target_summary(explanation) if encoder
                                       else explanation.target.description))):
        if j:
            head.append(" · ", style="dim")
        head.append(f"{key} ", style="dim")
        head.append(value, style="bold")
    console.print(head)
    summary = Table(box=None, show_header=False, pad_edge=False, padding=(0, 1, 0, 0))
    for style in ("dim", "", "dim", ""):
        summary.add_column(style=style, no_wrap=True)
    n_completion = len(explanation.tokens) - explanation.prompt_length
    token_types = explanation.token_type_relevance is not None
    pairs = [
        *([(key, Text(value)) for key, value in _encoder_target_pairs(explanation)] if encoder
          else [("target logit", Text(format_number(explanation.target_logit)))]),
        ("tokens", Text(f"{len(explanation.tokens)} input" if encoder else
                        f"{explanation.prompt_length} prompt + {n_completion} completion")),
        ("Σ token relevance", Text(format_number(c.token_sum))),
        ("Σ positional relevance", Text(format_number(c.positional_sum))),
        *((f"  Σ {label}", Text(format_number(value)))
          for label, value in _part_sums(explanation, labelled=True)),
        *([("Σ token-type relevance", Text(format_number(c.token_type_sum)))] if token_types
          else []),
        ("positional share", Text(format_share(explanation.positional_share))),
        ("reached inputs", Text(format_share((c.token_sum + c.positional_sum + c.token_type_sum)
                                             / c.target_logit) if c.target_logit else "–")),
        ("softmax rule absorbed", Text(format_number(c.softmax_absorbed))),
        *([("biases kept", Text(format_number(c.bias_absorbed)))] if c.bias_absorbed else []),
        ("conservation rel. error", Text(format_number(c.relative_error))),
        ("error excl. softmax", Text(format_number(closure), style=rel_style)),
    ]
    if console.width < 110:  # one pair per line rather than truncating numbers
        summary = Table(box=None, show_header=False, pad_edge=False, padding=(0, 1, 0, 0))
        summary.add_column(style="dim", no_wrap=True)
        summary.add_column(no_wrap=True)
        for key, value in pairs:
            summary.add_row(key, value)
    else:
        if len(pairs) % 2:
            pairs.append(("", Text("")))
        for i in range(0, len(pairs), 2):
            (k1, v1), (k2, v2) = pairs[i], pairs[i + 1]
            summary.add_row(k1, v1, "  " + k2, v2)
    console.print(summary)
    console.print()

    # Top-k tokens.
    if top_k > 0 and explanation.tokens:
        top = Table(box=box.SIMPLE_HEAD, title=f"top {top_k} tokens by |{view}|",
                    title_justify="left", title_style="bold", pad_edge=False)
        right = {"justify": "right"}
        for name, kw in (("#", right), ("pos", right), *([] if encoder else [("role", {})]),
                         ("token", {}), (view, right), ("token rel.", right),
                         ("positional rel.", right),
                         *([("token-type rel.", right)] if token_types else [])):
            top.add_column(name, **kw)
        for rank, (tok, value) in enumerate(explanation.top_tokens(top_k, by=field), 1):
            cell = Text(short_token(tok.text), style=Style(
                bgcolor=Color.from_rgb(*heat_rgb(value, max_abs)),
                color=Color.parse(_fg_for(value, max_abs))))
            top.add_row(str(rank), str(tok.index), *([] if encoder else [tok.role]), cell,
                        format_number(value),
                        format_number(explanation.token_relevance[tok.index]),
                        format_number(explanation.positional_relevance[tok.index]),
                        *([format_number(explanation.token_type_relevance[tok.index])]
                          if token_types else []))
        console.print(top)

    # Per-layer positional relevance: a sparkline, then the sums in side-by-side column groups.
    sums = _layer_sums(explanation)
    if sums:
        totals = [cs + ss for _, cs, ss in sums]
        title = Text()
        title.append("positional relevance per layer (Σ|cos|+Σ|sin|)  ", style="bold")
        title.append(_sparkline(totals), style="magenta")
        console.print(title)
        groups = max(1, min(math.ceil(len(sums) / 10), max(1, console.width // 26)))
        per_group = math.ceil(len(sums) / groups)
        layers = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for g in range(groups):
            layers.add_column("layer", justify="right", style="dim" if g else None)
            layers.add_column("Σ|cos|", justify="right")
            layers.add_column("Σ|sin|", justify="right")
        for r in range(per_group):
            cells = []
            for g in range(groups):
                k = g * per_group + r
                if k < len(sums):
                    layer, cs, ss = sums[k]
                    cells += [str(layer), format_number(cs), format_number(ss)]
                else:
                    cells += ["", "", ""]
            layers.add_row(*cells)
        console.print(layers)

    # Per-token rows.
    if explanation.rows:
        rows = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="per-token targets",
                     title_justify="left", title_style="bold")
        rows.add_column("row", justify="right")
        rows.add_column("pos", justify="right")
        rows.add_column("target token")
        rows.add_column("logit", justify="right")
        rows.add_column(f"top 3 input tokens by |{view}|")
        for k, row in enumerate(explanation.rows):
            text, _ = _row_target_token(explanation, row)
            row_values = getattr(row, field)
            row_max = _max_abs(row_values)
            cell = Text()
            for j, (tok, value) in enumerate(_row_top_inputs(explanation, row, field)):
                if j:
                    cell.append("  ")
                cell.append(short_token(tok.text, 16), style=Style(
                    bgcolor=Color.from_rgb(*heat_rgb(value, row_max)),
                    color=Color.parse(_fg_for(value, row_max))))
                cell.append(f" {format_number(value)}", style="dim")
            pos = ",".join(str(p) for p in row.target.positions)
            rows.add_row(str(k), pos, short_token(text), format_number(row.target_logit), cell)
        console.print(rows)

    if explanation.grounding is not None:
        _print_grounding(console, explanation)


def _share_bar(share: float, width: int = 20) -> str:
    filled = max(0, min(width, round(share * width)))
    return "█" * filled + "·" * (width - filled)


def _print_grounding(console: Console, explanation: Explanation) -> None:
    """Per-source shares, the grounding score and the sentences' supporting sources."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    grounding = explanation.grounding
    head = Text()
    head.append("grounding score ", style="bold")
    head.append(format_share(grounding.grounding_score), style="bold")
    if grounding.low_grounding:
        head.append(f"  LOW (threshold {format_share(grounding.threshold)})", style="bold red")
    else:
        head.append(f"  grounded (threshold {format_share(grounding.threshold)})", style="green")
    console.print(head)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in (("source", "left"), ("kind", "left"), ("tokens", "right"),
                          ("share", "left"), ("token", "right"), ("positional", "right"),
                          ("signed rel.", "right")):
        table.add_column(name, justify=justify)
    for source in grounding.sources:
        table.add_row(
            short_token(source.name, 28), source.kind, f"{source.token_start}–{source.token_end}",
            f"{_share_bar(source.share)} {format_share(source.share)}",
            format_share(source.token_share), format_share(source.positional_share),
            format_number(source.token_relevance + source.positional_relevance))
    table.add_row("[dim]outside: instructions, question[/dim]", "", "",
                  f"{_share_bar(grounding.instruction_share)} "
                  f"{format_share(grounding.instruction_share)}", "", "", "")
    table.add_row("[dim]outside: positions[/dim]", "", "",
                  f"{_share_bar(grounding.positional_share)} "
                  f"{format_share(grounding.positional_share)}", "", "", "")
    console.print(table)
    if grounding.sentences:
        names = [s.name for s in grounding.sources]
        sentences = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="completion sentences",
                          title_justify="left", title_style="bold")
        sentences.add_column("#", justify="right")
        sentences.add_column("sentence")
        sentences.add_column("supported by")
        sentences.add_column("score", justify="right")
        for sentence in grounding.sentences:
            support = ", ".join(names[i] for i in sentence.supporting_sources) or "—"
            sentences.add_row(str(sentence.index), short_token(sentence.text, 60), support,
                              format_share(sentence.grounding_score))
        console.print(sentences)


# --- HTML -----------------------------------------------------------------------------------
_CSS = """
:root { --pos: rgb(220,38,38); --neg: rgb(37,99,235); --fg: #1f2328; --muted: #656d76;
        --border: #d0d7de; --bg: #ffffff; --panel: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; font: 14px/1.5 system-ui, -apple-system, "Segoe UI",
       Roboto, "Helvetica Neue", Arial, sans-serif; color: var(--fg); background: var(--bg); }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 8px; }
.meta { color: var(--muted); }
.meta b { color: var(--fg); font-weight: 600; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 16px; }
.card { background: var(--panel); border: 1px solid var(--border); border-radius: 8px;
        padding: 8px 14px; min-width: 150px; }
.card .k { color: var(--muted); font-size: 12px; }
.card .v { font: 600 17px/1.3 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.good { color: #1a7f37; } .warn { color: #9a6700; } .bad { color: #cf222e; }
.gbar { display: flex; width: 220px; height: 10px; background: var(--panel);
        border: 1px solid var(--border); border-radius: 3px; overflow: hidden; }
.gbar .gtok { background: rgb(180,83,9); } .gbar .gpos { background: rgba(180,83,9,0.35); }
.controls { display: flex; flex-wrap: wrap; align-items: center; gap: 16px; margin: 8px 0; }
.seg { display: inline-flex; border: 1px solid var(--border); border-radius: 6px; overflow: hidden; }
.seg label { padding: 4px 12px; cursor: pointer; border-left: 1px solid var(--border); user-select: none; }
.seg label:first-of-type { border-left: 0; }
.seg input { display: none; }
.seg input:checked + span { font-weight: 600; }
.seg label:has(input:checked) { background: #ddf4ff; }
.legend { display: inline-flex; align-items: center; gap: 6px; color: var(--muted); font-size: 12px; }
.legend .bar { width: 160px; height: 12px; border: 1px solid var(--border); border-radius: 3px;
  background: linear-gradient(to right, rgb(37,99,235), #fff 50%, rgb(220,38,38)); }
.heat { border: 1px solid var(--border); border-radius: 8px; overflow: hidden; }
.heat .label { font-size: 12px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted);
  background: var(--panel); padding: 3px 12px; border-bottom: 1px solid var(--border); }
.heat .label.completion { border-top: 2px dashed #8250df; color: #8250df; }
.tokens { padding: 10px 12px; white-space: pre-wrap; word-break: break-word;
  font: 14px/1.9 ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
.tok { border-radius: 3px; padding: 1px 0; cursor: default; }
.tok:hover, .tok.hl { outline: 2px solid #8250df; outline-offset: 0; }
#info { min-height: 1.6em; font: 12px/1.6 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  color: var(--muted); margin: 6px 2px; }
svg { display: block; width: 100%; height: auto; border: 1px solid var(--border); border-radius: 8px;
  background: #fff; }
svg text { font: 11px system-ui, sans-serif; fill: var(--muted); }
svg .bar:hover { opacity: .7; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid var(--border); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: var(--panel); font-weight: 600; }
td.num { text-align: right; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.chip { display: inline-block; border-radius: 3px; padding: 0 4px; margin: 1px 4px 1px 0;
  font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre; }
tr.row { cursor: pointer; } tr.row:hover { background: #f6f8fa; } tr.row.sel { background: #ddf4ff; }
.note { color: var(--muted); font-size: 12px; }
.pair { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 16px;
  align-items: start; }
.pair h3 { font-size: 15px; margin: 8px 0 6px; }
.cards.small { margin: 8px 0; gap: 6px; }
.cards.small .card { min-width: 110px; padding: 4px 10px; }
.cards.small .card .v { font-size: 14px; }
@media (max-width: 820px) { .pair { grid-template-columns: minmax(0, 1fr); } }
"""

_JS = """
(function () {
  var data = JSON.parse(document.getElementById('explanation').textContent);
  var FIELDS = {combined: 'combined_relevance', token: 'token_relevance', positional: 'positional_relevance',
                token_type: 'token_type_relevance'};
  var SIDES = data.other ? ['main', 'other'] : ['main'];
  var NAMES = {main: 'query', other: 'document'};
  var state = {view: 'combined', row: -1};
  var spans = Array.prototype.slice.call(document.querySelectorAll('span.tok'));
  var bySide = {main: [], other: []};
  var info = document.getElementById('info');
  var rowLabel = document.getElementById('row-label');
  function sideOf(el) { return el.dataset.side === 'other' ? 'other' : 'main'; }
  spans.forEach(function (s) { bySide[sideOf(s)][+s.dataset.i] = s; });
  function fmt(x) {
    if (x === null || x === undefined || !isFinite(x)) return String(x);
    var a = Math.abs(x);
    if (a === 0) return '0';
    if (a >= 1e-3 && a < 1e5) return x.toFixed(4);
    return x.toExponential(3);
  }
  function rgb(v, m) {
    var t = (m > 0 && v !== null && isFinite(v)) ? Math.min(1, Math.abs(v) / m) : 0;
    var b = v < 0 ? [37, 99, 235] : [220, 38, 38];
    var c = [0, 1, 2].map(function (i) { return Math.round(255 + (b[i] - 255) * t); });
    return {bg: 'rgb(' + c.join(',') + ')', fg: t > 0.55 ? '#ffffff' : '#111111'};
  }
  // a similarity's two texts share one scale (both explain half the cosine, in the same units)
  function source(side) {
    if (side === 'other') return data.other;
    return state.row < 0 ? data : data.rows[state.row];
  }
  function values(side) { return source(side)[FIELDS[state.view]] || []; }
  function paint() {
    var m = 0;
    SIDES.forEach(function (side) {
      values(side).forEach(function (v) { if (v !== null && isFinite(v)) m = Math.max(m, Math.abs(v)); });
    });
    spans.forEach(function (s) {
      var c = rgb(values(sideOf(s))[+s.dataset.i], m);
      s.style.background = c.bg; s.style.color = c.fg;
    });
    document.getElementById('max-abs').textContent = fmt(m);
    if (rowLabel) rowLabel.textContent = state.row < 0 ? 'summed target (' + data.target.description + ')'
                                                     : 'row ' + state.row + ': ' + data.rows[state.row].target.description;
    document.querySelectorAll('tr.row').forEach(function (tr) {
      tr.classList.toggle('sel', +tr.dataset.row === state.row);
    });
  }
  document.querySelectorAll('input[name=view]').forEach(function (el) {
    el.addEventListener('change', function () { state.view = el.value; paint(); });
  });
  document.querySelectorAll('tr.row').forEach(function (tr) {
    tr.addEventListener('click', function () {
      var r = +tr.dataset.row; state.row = state.row === r ? -1 : r; paint();
    });
  });
  var reset = document.getElementById('row-reset');
  if (reset) reset.addEventListener('click', function () { state.row = -1; paint(); });
  function show(i, side) {
    var src = source(side), t = (side === 'other' ? data.other : data).tokens[i];
    var types = src.token_type_relevance;
    info.textContent = (data.other ? NAMES[side] + ' ' : '') + '#' + i + ' ' + t.role + '  ' +
      JSON.stringify(t.text) + '  id ' + t.id +
      '  token ' + fmt(src.token_relevance[i]) + '  positional ' + fmt(src.positional_relevance[i]) +
      (types ? '  token type ' + fmt(types[i]) : '') + '  combined ' + fmt(src.combined_relevance[i]);
  }
  function highlight(i, side, on) { var s = bySide[side][i]; if (s) s.classList.toggle('hl', on); }
  spans.forEach(function (s) {
    s.addEventListener('mouseenter', function () { show(+s.dataset.i, sideOf(s)); });
  });
  document.querySelectorAll('svg [data-i]').forEach(function (el) {
    var side = sideOf(el);
    el.addEventListener('mouseenter', function () { show(+el.dataset.i, side); highlight(+el.dataset.i, side, true); });
    el.addEventListener('mouseleave', function () { highlight(+el.dataset.i, side, false); });
  });
  paint();
})();
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _embedded_json(explanation: Explanation) -> str:
    """The explanation JSON, safe inside a ``<script>`` element (still valid JSON)."""
    return explanation.model_dump_json().replace("</", "<\\/").replace("<!--", "<\\u0021--")


def _bar_svg(explanation: Explanation, svg_id: str = "positional-bars", side: str = "") -> str:
    """Positional relevance per position, one bar each; ``side``: 'other' for the document of a
    similarity (its bars carry ``data-side``)."""
    values = explanation.positional_relevance
    side_attr = f' data-side="{side}"' if side else ""
    what = "positional" if _rotary_or_none(explanation) else "position table"
    n = len(values)
    width, height, left, pad = 1000.0, 180.0, 56.0, 14.0
    plot_w = width - left - 8
    mid = height / 2
    half = mid - pad
    top = _max_abs(values)
    bw = plot_w / max(n, 1)
    parts = [
        f'<svg id="{svg_id}" viewBox="0 0 {width:g} {height:g}" role="img" '
        f'aria-label="positional relevance per position">',
        f'<line x1="{left:g}" y1="{mid:g}" x2="{width - 8:g}" y2="{mid:g}" stroke="#8c959f" '
        f'stroke-width="1"/>',
        f'<text x="{left - 6:g}" y="{pad + 4:g}" text-anchor="end">{_e(format_number(top))}</text>',
        f'<text x="{left - 6:g}" y="{mid + 4:g}" text-anchor="end">0</text>',
        f'<text x="{left - 6:g}" y="{height - pad + 4:g}" text-anchor="end">'
        f'{_e(format_number(-top))}</text>',
    ]
    for i, v in enumerate(values):
        tok = explanation.tokens[i] if i < len(explanation.tokens) else None
        h = _intensity(v, top) * half
        if h <= 0:
            h = 0.0
        y = mid - h if (v or 0) >= 0 else mid
        r, g, b = POSITIVE_RGB if (v or 0) >= 0 else NEGATIVE_RGB
        label = f"#{i} {short_token(tok.text) if tok else ''}: {what} {format_number(v)}"
        parts.append(
            f'<rect class="bar" data-i="{i}"{side_attr} x="{left + i * bw:.2f}" y="{y:.2f}" '
            f'width="{max(bw * 0.85, 0.5):.2f}" height="{max(h, 0.5):.2f}" fill="rgb({r},{g},{b})">'
            f"<title>{_e(label)}</title></rect>"
        )
    if 0 < explanation.prompt_length < n:
        x = left + explanation.prompt_length * bw - bw * 0.075
        parts.append(
            f'<line x1="{x:.2f}" y1="4" x2="{x:.2f}" y2="{height - 4:g}" stroke="#8250df" '
            f'stroke-dasharray="4 3"/><text x="{x + 4:.2f}" y="12">completion →</text>'
        )
    parts.append(f'<text x="{left:g}" y="{height - 2:g}">0</text>')
    parts.append(f'<text x="{width - 8:g}" y="{height - 2:g}" text-anchor="end">{n - 1}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _layer_svg(explanation: Explanation) -> str:
    layers = explanation.positional_relevance_per_layer or []
    n = len(explanation.tokens)
    cell_h = max(6.0, min(14.0, 300.0 / max(len(layers), 1)))
    left, width = 56.0, 1000.0
    plot_w = width - left - 8
    cw = plot_w / max(n, 1)
    height = cell_h * len(layers) + 24
    signed = [[(c or 0.0) + (s or 0.0) for c, s in zip(lr.cos, lr.sin)] for lr in layers]
    top = max((_max_abs(r) for r in signed), default=0.0)
    every = max(1, math.ceil(len(layers) / 15))
    parts = [
        f'<svg id="layer-heatmap" viewBox="0 0 {width:g} {height:g}" role="img" '
        f'aria-label="positional relevance per layer and position">'
    ]
    for row, (lr, vals) in enumerate(zip(layers, signed)):
        y = 6 + row * cell_h
        if row % every == 0:
            parts.append(f'<text x="{left - 6:g}" y="{y + cell_h - 3:g}" text-anchor="end">'
                         f"L{lr.layer}</text>")
        for i, v in enumerate(vals):
            if v == 0:
                continue
            r, g, b = heat_rgb(v, top)
            label = (f"layer {lr.layer}, #{i}: cos {format_number(lr.cos[i])}, "
                     f"sin {format_number(lr.sin[i])}")
            parts.append(
                f'<rect data-i="{i}" x="{left + i * cw:.2f}" y="{y:g}" width="{cw:.2f}" '
                f'height="{cell_h:g}" fill="rgb({r},{g},{b})"><title>{_e(label)}</title></rect>'
            )
    if 0 < explanation.prompt_length < n:
        x = left + explanation.prompt_length * cw
        parts.append(f'<line x1="{x:.2f}" y1="2" x2="{x:.2f}" y2="{height - 16:g}" '
                     f'stroke="#8250df" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{left:g}" y="{height - 4:g}">position 0</text>')
    parts.append(f'<text x="{width - 8:g}" y="{height - 4:g}" text-anchor="end">{n - 1}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _token_span(explanation: Explanation, tok: Token, field: str, max_abs: float,
                side: str = "") -> str:
    i = tok.index
    types = explanation.token_type_relevance
    values = getattr(explanation, field)
    value = values[i] if i < len(values) else None
    r, g, b = heat_rgb(value, max_abs)
    title = "\n".join([
        f"#{i} ({tok.role}) {tok.text!r}",
        f"id {tok.id}",
        f"token relevance {format_number(explanation.token_relevance[i])}",
        f"positional relevance {format_number(explanation.positional_relevance[i])}",
        *(f"  {part.name} {format_number(part.relevance[i])}"
          for part in explanation.positional_parts or []),
        *([f"token-type relevance {format_number(types[i])}"] if types is not None else []),
        f"combined {format_number(explanation.combined_relevance[i])}",
    ])
    side_attr = f' data-side="{side}"' if side else ""
    return (
        f'<span class="tok" data-i="{i}"{side_attr} style="background:rgb({r},{g},{b});'
        f'color:{_fg_for(value, max_abs)}" title="{_e(title)}">{_e(display_token(tok.text))}</span>'
    )


def _chip(text: str, value: float, max_abs: float, note: str = "") -> str:
    r, g, b = heat_rgb(value, max_abs)
    extra = f' title="{_e(note)}"' if note else ""
    return (f'<span class="chip" style="background:rgb({r},{g},{b});color:{_fg_for(value, max_abs)}"'
            f"{extra}>{_e(short_token(text, 20))}</span>")


def _share_bar_html(token_share: float, positional_share: float) -> str:
    return (f'<div class="gbar"><span class="gtok" style="width:{100 * token_share:.2f}%"></span>'
            f'<span class="gpos" style="width:{100 * positional_share:.2f}%"></span></div>')


def _grounding_html(explanation: Explanation) -> str:
    grounding = explanation.grounding
    verdict = ('<span class="bad">low grounding</span>' if grounding.low_grounding
               else '<span class="good">grounded</span>')
    rows = []
    for source in grounding.sources:
        rows.append(
            f'<tr><td>{_e(source.name)}</td><td>{_e(source.kind)}</td>'
            f'<td class="num">{source.token_start}–{source.token_end}</td>'
            f"<td>{_share_bar_html(source.token_share, source.positional_share)}</td>"
            f'<td class="num">{_e(format_share(source.share))}</td>'
            f'<td class="num">{_e(format_share(source.token_share))}</td>'
            f'<td class="num">{_e(format_share(source.positional_share))}</td>'
            f'<td class="num">{_e(format_number(source.token_relevance + source.positional_relevance))}'
            "</td></tr>")
    for label, token_share, positional_share in (
            ("outside: instructions, question", grounding.instruction_share, 0.0),
            ("outside: positions", 0.0, grounding.positional_share)):
        rows.append(
            f'<tr class="note"><td>{label}</td><td></td><td></td>'
            f"<td>{_share_bar_html(token_share, positional_share)}</td>"
            f'<td class="num">{_e(format_share(token_share + positional_share))}</td>'
            "<td></td><td></td><td></td></tr>")
    names = [s.name for s in grounding.sources]
    sentences = "".join(
        f'<tr><td class="num">{s.index}</td><td>{_e(s.text)}</td>'
        f'<td>{_e(", ".join(names[i] for i in s.supporting_sources) or "—")}</td>'
        f'<td class="num">{_e(format_share(s.grounding_score))}</td></tr>'
        for s in grounding.sentences)
    html_ = (
        f"<h2>Grounding: {_e(format_share(grounding.grounding_score))} · {verdict}</h2>"
        f'<p class="note">Share of the prompt\'s relevance mass (|token| + |positional| '
        f"relevance) on each source; threshold {_e(format_share(grounding.threshold))}. Dark: "
        "token share, light: positional share.</p>"
        '<table id="grounding-sources"><thead><tr><th>source</th><th>kind</th><th>tokens</th>'
        "<th></th><th>share</th><th>token</th><th>positional</th><th>signed rel.</th></tr>"
        "</thead><tbody>" + "".join(rows) + "</tbody></table>")
    if sentences:
        html_ += ('<table id="grounding-sentences"><thead><tr><th>#</th><th>completion sentence'
                  "</th><th>supported by</th><th>score</th></tr></thead><tbody>" + sentences
                  + "</tbody></table>")
    return html_


def _rotary_or_none(explanation: Explanation) -> bool:
    """No additive position table among the parts: a RoPE model, a version-1 document, or a mode
    that gives positions nothing (``[]``)."""
    return all(part.kind == "rotary" for part in explanation.positional_parts or [])


def _positional_note(explanation: Explanation) -> str:
    if _rotary_or_none(explanation):
        return ("Sum over layers of the cos and sin relevance of each position's RoPE "
                "inputs (summed target). Hover a bar to find its token.")
    kinds = sorted({part.kind for part in explanation.positional_parts if part.kind != "rotary"})
    return (f"Relevance of each position's row of the {_e(' / '.join(kinds))} position table "
            "(<code>position_embedding</code>: one table added to the token embedding, no "
            "layers). Hover a bar to find its token.")


def _cards(explanation: Explanation, *, side: bool = False) -> list[tuple[str, str, str]]:
    """(label, value, css class) of the summary cards; ``side``: one text of a similarity, whose
    target the page's head cards already show."""
    c = explanation.conservation
    encoder = is_encoder(explanation)
    closure = c.relative_error_excluding_softmax
    err_class = "good" if closure <= 1e-3 else ("warn" if closure <= 1e-2 else "bad")
    n_completion = len(explanation.tokens) - explanation.prompt_length
    if not encoder:
        target = [("target logit", format_number(explanation.target_logit), "")]
    elif side:
        target = [("explains (½ cosine)", format_number(explanation.target_logit), "")]
    else:
        target = [(k, v, "") for k, v in _encoder_target_pairs(explanation)]
    types = explanation.token_type_relevance is not None
    return [
        *target,
        ("Σ token relevance", format_number(c.token_sum), ""),
        ("Σ positional relevance", format_number(c.positional_sum), ""),
        *((f"Σ {label}", format_number(value), "")
          for label, value in _part_sums(explanation, labelled=encoder)),
        *([("Σ token-type relevance", format_number(c.token_type_sum), "")] if types else []),
        ("positional share", format_share(explanation.positional_share), ""),
        ("conservation rel. error", format_number(c.relative_error), ""),
        ("softmax rule absorbed", format_number(c.softmax_absorbed), ""),
        *([("biases kept", format_number(c.bias_absorbed), "")] if c.bias_absorbed else []),
        ("error excl. softmax", format_number(closure), err_class),
        ("tokens", str(len(explanation.tokens)) if encoder
         else f"{explanation.prompt_length} + {n_completion}", ""),
    ]


def _cards_html(cards: list[tuple[str, str, str]], small: bool = False) -> str:
    body = "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v {cls}">{_e(v)}</div></div>'
        for k, v, cls in cards
    )
    return f'<div class="cards{" small" if small else ""}">{body}</div>'


def _heat_html(explanation: Explanation, field: str, max_abs: float, *, label: str | None = None,
               tokens_id: str | None = None, side: str = "") -> str:
    """The token heatmap: prompt (or ``label``) and completion; an encoder's tokens are input."""
    prompt = [t for t in explanation.tokens if t.role == "prompt"]
    completion = [t for t in explanation.tokens if t.role == "completion"]
    label = label or ("input" if is_encoder(explanation) else "prompt")
    tokens_id = tokens_id or f"{label}-tokens"
    heat = [f'<div class="heat"><div class="label">{_e(label)}</div>'
            f'<div class="tokens" id="{_e(tokens_id)}">']
    heat += [_token_span(explanation, t, field, max_abs, side) for t in prompt]
    heat.append("</div>")
    if completion:
        heat.append('<div class="label completion">completion</div>'
                    '<div class="tokens" id="completion-tokens">')
        heat += [_token_span(explanation, t, field, max_abs, side) for t in completion]
        heat.append("</div>")
    heat.append("</div>")
    return "".join(heat)


def _top_table(explanation: Explanation, top_k: int, field: str, max_abs: float) -> str:
    """The top-k tokens by |field|; an encoder's table has no role column and, with token
    types, a token-type column. "" when there is nothing to list."""
    encoder = is_encoder(explanation)
    types = explanation.token_type_relevance
    rows = []
    for rank, (tok, value) in enumerate(explanation.top_tokens(max(top_k, 0), by=field), 1):
        rows.append(
            f'<tr><td class="num">{rank}</td><td class="num">{tok.index}</td>'
            + ("" if encoder else f"<td>{_e(tok.role)}</td>")
            + f"<td>{_chip(tok.text, value, max_abs)}</td><td class=\"num\">{_e(format_number(value))}</td>"
            f'<td class="num">{_e(format_number(explanation.token_relevance[tok.index]))}</td>'
            f'<td class="num">{_e(format_number(explanation.positional_relevance[tok.index]))}</td>'
            + (f'<td class="num">{_e(format_number(types[tok.index]))}</td>'
               if types is not None else "")
            + "</tr>"
        )
    if not rows:
        return ""
    return ("<table><thead><tr><th>#</th><th>pos</th>" + ("" if encoder else "<th>role</th>")
            + "<th>token</th><th>combined</th><th>token rel.</th><th>positional rel.</th>"
            + ("<th>token-type rel.</th>" if types is not None else "")
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _views_html(explanation: Explanation) -> str:
    names = list(FIELDS)
    if explanation.token_type_relevance is not None or (
            explanation.other is not None and explanation.other.token_type_relevance is not None):
        names.append("token_type")
    return "".join(
        f'<label><input type="radio" name="view" value="{name}"{" checked" if name == "combined" else ""}>'
        f"<span>{name.replace('_', ' ')}</span></label>"
        for name in names
    )


def _page(explanation: Explanation, body: list[str]) -> str:
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>PA-LRP explanation — {_e(explanation.model)}</title><style>{_CSS}</style></head><body>",
        "<h1>PA-LRP explanation</h1>",
        *body,
        f'<script type="application/json" id="explanation">{_embedded_json(explanation)}</script>',
        f"<script>{_JS}</script></body></html>\n",
    ])


def _controls_html(explanation: Explanation, max_abs: float, row_label: str = "") -> str:
    return (f'<div class="controls"><div class="seg" role="radiogroup" aria-label="relevance">'
            f"{_views_html(explanation)}</div>"
            '<span class="legend">−max <span class="bar"></span> +max · max |value| = '
            f'<b id="max-abs">{_e(format_number(max_abs))}</b></span>{row_label}</div>')


def _similarity_html(explanation: Explanation, top_k: int) -> str:
    """A similarity: the two texts side by side (query: the explained text; document: ``other``),
    each with its heatmap, cards, top tokens and position-table plot, on one colour scale."""
    field = "combined_relevance"
    other = explanation.other
    sides = (("query", explanation, ""), ("document", other, "other"))
    max_abs = max(_max_abs(explanation.combined_relevance), _max_abs(other.combined_relevance))
    worst = max(explanation.conservation.relative_error_excluding_softmax,
                other.conservation.relative_error_excluding_softmax)
    head_cards = [
        ("cosine similarity", format_number(explanation.target.value), ""),
        ("query explains (½)", format_number(explanation.target_logit), ""),
        ("document explains (½)", format_number(other.target_logit), ""),
        ("error excl. softmax (worse side)", format_number(worst),
         "good" if worst <= 1e-3 else ("warn" if worst <= 1e-2 else "bad")),
        ("tokens", f"{len(explanation.tokens)} + {len(other.tokens)}", ""),
    ]

    def pair(blocks: list[str]) -> str:
        return '<div class="pair">' + "".join(f"<div>{b}</div>" for b in blocks) + "</div>"

    heat = pair([
        f'<h3>{name} <span class="note">{"the explained text" if not side else "the other text (explanation.other)"}</span></h3>'
        + _heat_html(shown, field, max_abs, label=name, tokens_id=f"{name}-tokens", side=side)
        + _cards_html(_cards(shown, side=True), small=True)
        for name, shown, side in sides])
    sections = []
    tops = [(name, _top_table(shown, top_k, field, max_abs)) for name, shown, _ in sides]
    if any(table for _, table in tops):
        sections.append(f"<h2>Top {top_k} tokens by |combined relevance|</h2>"
                        + pair([f"<h3>{name}</h3>{table}" for name, table in tops]))
    sections.append(
        "<h2>Positional relevance per position</h2>"
        f'<p class="note">{_positional_note(explanation)}</p>'
        + pair([f"<h3>{name}</h3>"
                + _bar_svg(shown, "positional-bars" + ("-" + name if side else ""), side)
                for name, shown, side in sides]))
    return _page(explanation, [
        f'<div class="meta">model <b>{_e(explanation.model)}</b> · mode <b>{_e(explanation.mode)}</b>'
        f" · target <b>similarity</b>: the cosine of the two texts' pooled embeddings; each text's "
        "relevance conserves half of it (norms held, uniform rule)</div>",
        _cards_html(head_cards),
        "<h2>Token heatmaps</h2>",
        _controls_html(explanation, max_abs),
        heat,
        '<div id="info">hover a token for details</div>',
        *sections,
    ])


def explanation_html(explanation: Explanation, *, top_k: int = 10) -> str:
    """A self-contained HTML page (inline CSS, JS and SVG; nothing is fetched). A similarity
    explanation (with ``other``) shows its two texts side by side."""
    if explanation.other is not None:
        return _similarity_html(explanation, top_k)
    field = "combined_relevance"
    max_abs = _max_abs(explanation.combined_relevance)
    encoder = is_encoder(explanation)

    sections = []
    top = _top_table(explanation, top_k, field, max_abs)
    if top:
        sections.append(f"<h2>Top {top_k} tokens by |combined relevance|</h2>" + top)
    sections += [
        "<h2>Positional relevance per position</h2>"
        f'<p class="note">{_positional_note(explanation)}</p>' + _bar_svg(explanation),
    ]
    if explanation.positional_relevance_per_layer:
        sums = _layer_sums(explanation)
        layer_rows = "".join(
            f'<tr><td class="num">{layer}</td><td class="num">{_e(format_number(cs))}</td>'
            f'<td class="num">{_e(format_number(ss))}</td></tr>'
            for layer, cs, ss in sums
        )
        sections.append(
            "<h2>Positional relevance per layer</h2>"
            '<p class="note">Rows are layers, columns positions; colour is cos + sin relevance '
            "(red positive, blue negative).</p>" + _layer_svg(explanation)
            + '<details><summary class="note">per-layer sums</summary><table><thead><tr><th>layer</th>'
            "<th>Σ|cos|</th><th>Σ|sin|</th></tr></thead><tbody>" + layer_rows + "</tbody></table></details>"
        )
    if explanation.rows:
        body = []
        for k, row in enumerate(explanation.rows):
            text, token_id = _row_target_token(explanation, row)
            row_max = _max_abs(row.combined_relevance)
            chips = "".join(
                _chip(tok.text, value, row_max, f"#{tok.index} combined {format_number(value)}")
                for tok, value in _row_top_inputs(explanation, row, field)
            )
            pos = ",".join(str(p) for p in row.target.positions)
            body.append(
                f'<tr class="row" data-row="{k}"><td class="num">{k}</td><td class="num">{_e(pos)}</td>'
                f"<td>{_chip(text, 0.0, 1.0)} <span class=\"note\">id {_e(token_id)}</span></td>"
                f'<td class="num">{_e(format_number(row.target_logit))}</td>'
                f'<td class="num">{_e(format_number(row.conservation.relative_error))}</td>'
                f"<td>{chips}</td></tr>"
            )
        sections.append(
            "<h2>Per-token targets</h2>"
            '<p class="note">One row per completion token (its own logit as target). Click a row to '
            'show its relevance in the heatmap; click again or <button id="row-reset" type="button">'
            "reset</button> to go back to the summed target.</p>"
            "<table><thead><tr><th>row</th><th>pos</th><th>target token</th><th>logit</th>"
            "<th>rel. error</th><th>top 3 input tokens (combined)</th></tr></thead><tbody>"
            + "".join(body) + "</tbody></table>"
        )

    if explanation.grounding is not None:
        sections.insert(0, _grounding_html(explanation))

    row_label = (
        '<span class="note">showing: <b id="row-label"></b></span>' if explanation.rows else ""
    )
    target = (f"<b>{_e(explanation.target.kind)}</b>: {_e(explanation.target.description)}"
              if encoder else f"<b>{_e(explanation.target.description)}</b>")
    return _page(explanation, [
        f'<div class="meta">model <b>{_e(explanation.model)}</b> · mode <b>{_e(explanation.mode)}</b>'
        f" · target {target}</div>",
        _cards_html(_cards(explanation)),
        "<h2>Token heatmap</h2>",
        _controls_html(explanation, max_abs, row_label),
        _heat_html(explanation, field, max_abs),
        '<div id="info">hover a token for details</div>',
        *sections,
    ])
