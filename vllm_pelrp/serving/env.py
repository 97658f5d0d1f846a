"""The plugin's environment settings, read one way, with an error that names the setting.

Switches (``VLLM_PELRP_COMPILED``, ``VLLM_PELRP_FRESH_CHUNK``, ``VLLM_PELRP_SPARE_CORES``)
take 1/true/yes/on or 0/false/no/off, in any case and with surrounding spaces; unset or empty
means the default. Sizes and counts (``VLLM_PELRP_MAX_RECORD_MB``, ``VLLM_PELRP_MAX_EXPLAIN_COST``,
``PELRP_RECENT_MB``, ``PELRP_RECENT_EXPLANATIONS``, ``PELRP_RECENT_TTL_S``) take a non-negative
number. Anything else is refused when the setting is read (at plugin or worker start), rather
than silently read as the default. Text (``VLLM_PELRP_OPERATOR_KEY``) is taken as it is, less
surrounding spaces.
"""

from __future__ import annotations

import os

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


def env_switch(name: str, default: bool = True) -> bool:
    """The on/off setting ``$name``; ``default`` when unset or empty."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in ON:
        return True
    if value in OFF:
        return False
    raise ValueError(f"{name}={raw!r} is not an on/off setting; allowed: "
                     f"{', '.join(ON)} (on) or {', '.join(OFF)} (off)")


def env_number(name: str, default: float, *, integer: bool = False) -> int | float:
    """The non-negative number ``$name`` (a whole one if ``integer``); ``default`` when unset
    or empty."""
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    kind = "a whole number" if integer else "a number"
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not {kind}; allowed: {kind} >= 0") from None
    if not value >= 0 or value == float("inf") or (integer and value != int(value)):
        raise ValueError(f"{name}={raw!r} is out of range; allowed: {kind} >= 0")
    return int(value) if integer else value


def env_text(name: str) -> str | None:
    """The text setting ``$name`` without surrounding spaces; None when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value or None
