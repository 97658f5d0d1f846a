"""Every environment variable vllm-pelrp reads or sets, in one registry (in the manner of vLLM's
``envs.py``): its name, default, parser and a one-line doc. No other module of the package
touches ``os.environ``; they call ``get(NAME)`` (or read ``settings.NAME``).

The project's own variables share one prefix, ``VLLM_PELRP_``. A few had other names before;
those still work for one release, with a ``DeprecationWarning`` naming the new one. Variables
of vLLM and of the system that the package reads or sets (``VLLM_PLUGINS``, ...) are listed
too, under ``owner`` "vllm" or "system": their names are not ours to change.

Parsing is strict: unset or empty means the default; anything a parser does not take raises
``ValueError`` naming the variable and what it takes, so a typo such as
``VLLM_PELRP_SPARE_CORES=of`` is never read as the default. ``docs/serving.md``'s settings table
is ``markdown_table()``'s output (a test holds them equal).

This module imports nothing but the standard library: the kernels and the engine read it on a
bare GPU machine too.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

PREFIX = "VLLM_PELRP_"
ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


# ---- parsers: (name, raw text) -> value; raise ValueError naming the variable -----------------


def switch(name: str, raw: str) -> bool:
    """On/off: 1/true/yes/on or 0/false/no/off, in any case."""
    value = raw.strip().lower()
    if value in ON:
        return True
    if value in OFF:
        return False
    raise ValueError(f"{name}={raw!r} is not an on/off setting; allowed: "
                     f"{', '.join(ON)} (on) or {', '.join(OFF)} (off)")


def _number(name: str, raw: str, *, integer: bool) -> int | float:
    kind = "a whole number" if integer else "a number"
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not {kind}; allowed: {kind} >= 0") from None
    if not value >= 0 or value == float("inf") or (integer and value != int(value)):
        raise ValueError(f"{name}={raw!r} is out of range; allowed: {kind} >= 0")
    return int(value) if integer else value


def number(name: str, raw: str) -> float:
    """A number >= 0."""
    return _number(name, raw, integer=False)


def whole_number(name: str, raw: str) -> int:
    """A whole number >= 0."""
    return int(_number(name, raw, integer=True))


def fraction(name: str, raw: str) -> float:
    """A number from 0 to 1."""
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={raw!r}: expected a number from 0 to 1")
    return value


ACTIVATIONS = ("record", "recompute", "auto")


def activations(name: str, raw: str) -> str:
    """record, recompute or auto."""
    value = raw.strip().lower()
    if value not in ACTIVATIONS:
        raise ValueError(f"{name}={raw!r} is not a source of activations; allowed: "
                         f"{', '.join(ACTIVATIONS)}")
    return value


def text(name: str, raw: str) -> str | None:
    """Any text, less surrounding spaces."""
    return raw.strip() or None


def level(name: str, raw: str) -> str:
    """A logging level name."""
    return raw.strip().upper()


def names(name: str, raw: str) -> tuple[str, ...]:
    """A comma-separated list of names."""
    return tuple(part.strip() for part in raw.split(",") if part.strip())


# ---- the registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[str, str], Any]
    doc: str
    old_name: str | None = None  # the name before the one prefix; read for one release, warned
    replaces: str | None = None  # a name whose value meant something else: refused, naming this
    owner: str = "pelrp"  # "pelrp" (ours), "vllm" or "system": whose variable it is
    takes: str = ""  # what the docs say it takes; the parser's docstring when empty
    shown_default: str = ""  # the default as the docs say it; repr(default) when empty

    def read(self, environ: Mapping[str, str]) -> Any:
        if self.replaces and (environ.get(self.replaces) or "").strip():
            raise ValueError(f"{self.replaces} is no longer read: its value meant something "
                             f"else; set {self.name} instead ({self.doc})")
        raw = environ.get(self.name)
        name = self.name
        if (raw is None or not raw.strip()) and self.old_name and environ.get(self.old_name):
            raw, name = environ[self.old_name], self.old_name
            warnings.warn(f"{self.old_name} is deprecated and will stop working in the next "
                          f"release; set {self.name} instead", DeprecationWarning, stacklevel=4)
        if raw is None or not raw.strip():
            return self.default
        return self.parse(name, raw)


def _settings(*items: Setting) -> dict[str, Setting]:
    return {item.name: item for item in items}


SETTINGS: dict[str, Setting] = _settings(
    # serving: recording and the worker
    Setting("VLLM_PELRP_ACTIVATIONS", "auto", activations,
            "where explained requests take their layer inputs: `record` (a device pool that "
            "vLLM's forward writes), `recompute` (the worker's own forward from the ids) or "
            "`auto` (record on CPU, recompute elsewhere; `pelrp serve --explain-activations`)"),
    Setting("VLLM_PELRP_FRESH_CHUNK", True, switch,
            "call the compiled forward on a fresh CPython frame-stack chunk"),
    Setting("VLLM_PELRP_SPARE_CORES", True, switch,
            "run the backward's layer recomputes on the core vLLM keeps for its scheduler while "
            "no request is generating"),
    Setting("VLLM_PELRP_MAX_RECORD_MB", 2048, number,
            "cap on the memory of recorded activations, MiB (`pelrp serve --record-cap-mb`)"),
    Setting("VLLM_PELRP_MAX_EXPLAIN_GFLOP", 30000, number,
            "cap on one request's explanation work, in GFLOP (10⁹ floating-point operations: "
            "the forward and backward passes, from the model's layers, widths and tokens; "
            "30000 ≈ 32 target rows × 2,048 tokens on SmolLM2-135M) (`pelrp serve "
            "--max-explain-gflop`)", replaces="VLLM_PELRP_MAX_EXPLAIN_COST"),
    Setting("VLLM_PELRP_EXPLAIN_MEMORY_MB", None, number,
            "memory budget of the explanations in flight, MiB: their backward's working set and "
            "their recorded residual stream, per worker (`pelrp serve --explain-memory-mb`; "
            "unset: 90 % of the device memory vLLM leaves free, on CPU half the host's "
            "available memory, read when the worker sets up)", shown_default="unset"),
    # serving: the API process
    Setting("VLLM_PELRP_OPERATOR_KEY", None, text,
            "the operator's key: lists every explanation (`GET /v1/explanations?scope=all`, "
            "header `X-Pelrp-Operator-Key`)", takes="any text", shown_default="unset"),
    Setting("VLLM_PELRP_RECENT_EXPLANATIONS", 256, whole_number,
            "explanations the server keeps for reading back by id", "PELRP_RECENT_EXPLANATIONS"),
    Setting("VLLM_PELRP_RECENT_MB", 64, number,
            "MiB of explanation JSON the server keeps", "PELRP_RECENT_MB"),
    Setting("VLLM_PELRP_RECENT_TTL_S", 3600, number,
            "seconds the server keeps each explanation", "PELRP_RECENT_TTL_S"),
    Setting("VLLM_PELRP_GROUNDING_THRESHOLD", 0.3, fraction,
            "the server's default grounding threshold (`pelrp serve --grounding-threshold`)",
            "PELRP_GROUNDING_THRESHOLD"),
    # models and kernels
    Setting("VLLM_PELRP_CACHE", None, text,
            "where converted shipped models are kept (default `$XDG_CACHE_HOME/vllm-pelrp`)",
            takes="a folder", shown_default="unset"),
    Setting("VLLM_PELRP_FORCE_TRITON", False, switch,
            "run the Triton kernels on CPU tensors (needs `TRITON_INTERPRET=1` before import)"),
    Setting("VLLM_PELRP_ROPE_FAST_TRIG", False, switch,
            "the RoPE kernel's fast (not libdevice) sin/cos on CUDA"),
    # tests and benchmarks
    Setting("VLLM_PELRP_TEST_SERVER", None, text,
            "tests: a running `pelrp serve` URL to test instead of starting one",
            "PELRP_TEST_SERVER", takes="a URL", shown_default="unset"),
    Setting("VLLM_PELRP_TEST_EAGER", False, switch,
            "tests: start the test servers with `--eager`", "PELRP_TEST_EAGER"),
    Setting("VLLM_PELRP_BENCH_THREADS", None, whole_number,
            "benchmarks: torch threads (default: torch's)", "PELRP_BENCH_THREADS",
            shown_default="unset"),
    # vLLM's and the system's, read or set by the package
    Setting("VLLM_PLUGINS", None, names,
            "vLLM's plugins to load: the plugin acts only when it names `pelrp` (`pelrp serve` "
            "adds it)", owner="vllm", shown_default="unset (all)"),
    Setting("VLLM_CONFIGURE_LOGGING", True, switch,
            "vLLM configures logging; the plugin then logs through vLLM's handler",
            owner="vllm"),
    Setting("VLLM_LOGGING_LEVEL", "INFO", level, "vLLM's log level, the plugin's too",
            owner="vllm"),
    Setting("VLLM_CPU_KVCACHE_SPACE", None, text,
            "vLLM's CPU KV cache size, GiB: when set, `pelrp serve` gives no "
            "`--kv-cache-memory-bytes`", owner="vllm", takes="a number", shown_default="unset"),
    Setting("XDG_CACHE_HOME", None, text, "the user cache root (default `~/.cache`)",
            owner="system", takes="a folder", shown_default="unset"),
)

OLD_NAMES = {s.old_name: s.name for s in SETTINGS.values() if s.old_name}
REPLACED_NAMES = {s.replaces: s.name for s in SETTINGS.values() if s.replaces}


def get(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """The value of setting ``name`` in ``environ`` (default: this process's environment)."""
    try:
        setting = SETTINGS[name]
    except KeyError:
        raise KeyError(f"{name} is not a registered setting (vllm_pelrp/settings.py)") from None
    return setting.read(os.environ if environ is None else environ)


def __getattr__(name: str) -> Any:  # settings.VLLM_PELRP_ACTIVATIONS, as vllm.envs does
    if name in SETTINGS:
        return get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def environment(**values: Any) -> dict[str, str]:
    """This process's environment with ``values`` set (None: left as it is), for a child
    process; each name must be registered and each value is checked by its parser."""
    child = dict(os.environ)
    for name, value in values.items():
        if value is None:
            continue
        child[name] = _checked(name, value)
    return child


def set_in_process(name: str, value: Any) -> None:
    """Set registered setting ``name`` in this process's environment (checked by its parser)."""
    os.environ[name] = _checked(name, value)


def _checked(name: str, value: Any) -> str:
    """``value`` as the text of setting ``name``, after its parser took it."""
    if name not in SETTINGS:
        raise KeyError(f"{name} is not a registered setting (vllm_pelrp/settings.py)")
    if isinstance(value, bool):
        raw = "1" if value else "0"
    elif isinstance(value, (tuple, list)):
        raw = ",".join(str(v) for v in value)
    else:
        raw = str(value)
    SETTINGS[name].parse(name, raw)
    return raw


def project_names(environ: Mapping[str, str]) -> list[str]:
    """The names in ``environ`` that are the project's own settings (old names included)."""
    return sorted(k for k in environ if k.startswith(PREFIX) or k in OLD_NAMES)


def markdown_table() -> str:
    """The settings table of docs/serving.md."""
    lines = ["| setting | default | takes | what it does |", "|---|---|---|---|"]
    for owner in ("pelrp", "vllm", "system"):
        for s in SETTINGS.values():
            if s.owner != owner:
                continue
            name = f"`{s.name}`" + (f" (was `{s.old_name}`)" if s.old_name else "")
            if s.replaces:
                name += f" (replaces `{s.replaces}`, no longer read)"
            if owner != "pelrp":
                name += f" ({owner}'s)"
            default = s.shown_default or _shown(s.default)
            takes = s.takes or _lower_first((s.parse.__doc__ or "").strip().rstrip("."))
            lines.append(f"| {name} | {default} | {takes} | {s.doc} |")
    return "\n".join(lines)


def _lower_first(words: str) -> str:
    return words[:1].lower() + words[1:]


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else str(value)
