"""The terminal view of an :class:`~vllm_pelrp.explanation.Explanation` (rich):
:func:`print_explanation` prints a coloured token heatmap plus summary tables.

The HTML view is the web view's script (``serving/static/pelrp.js``), inlined by
:mod:`vllm_pelrp.html_page`; this module draws for terminals only. It takes the explanation as
an argument and never imports :mod:`vllm_pelrp.explanation` at run time (the dependency goes one
way: ``Explanation.print`` imports this module).

Colours: red for positive relevance, blue for negative, white for zero; the intensity is
``|value| / max |value|`` over the tokens shown.
"""

from __future__ import annotations

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
    """Compact, fixed formatting used for every number shown."""
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

    encoder = explanation.is_encoder
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
