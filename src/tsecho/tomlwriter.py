"""Values written as TOML text: for config error messages and for ``tsechod check-config``.

Owns how a setting's value looks when shown to the operator: the same
rendering in an error (``[server] backlog = 0``) as in check-config's output,
which parses back to the same settings with tomllib. Nothing is read here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Final

from .address import ListenAddress

_SHOWN_CHARS: Final = 120  # longer values are cut in error messages
_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    """*text* as a TOML basic string: quoted, with every control character escaped."""
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(value: object, *, cut: bool = True) -> str:
    """Render *value* as TOML; with *cut*, shortened to a readable length for a message."""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, int):
        # str() of a huge int is slow or refused (sys.get_int_max_str_digits).
        shown = str(value) if value.bit_length() <= 256 else f"<a {value.bit_length()}-bit integer>"
    elif isinstance(value, float):
        if math.isnan(value):
            shown = "nan"
        elif math.isinf(value):
            shown = "inf" if value > 0 else "-inf"
        else:
            shown = repr(value)
    elif isinstance(value, str | Path | ListenAddress):
        shown = toml_string(str(value))
    elif isinstance(value, list | tuple):
        shown = "[" + ", ".join(toml_value(item, cut=False) for item in value) + "]"
    elif isinstance(value, dict):
        shown = "{" + ", ".join(f"{toml_string(str(k))} = {toml_value(v, cut=False)}" for k, v in value.items()) + "}"
    else:
        shown = value.isoformat() if hasattr(value, "isoformat") else str(value)
    if cut and len(shown) > _SHOWN_CHARS:
        return shown[:_SHOWN_CHARS] + "..."
    return shown
