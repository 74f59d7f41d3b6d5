"""Container names from names a person types.

A server is a Docker container on the droplet, and its name is the container's name, so it must
match Docker's rule (1-63 of letters, digits, `_`, `.`, `-`, starting with a letter or digit;
the same check is on the `instance_name_on_toolbox` column). People type "Weather API Server" or
"Météo/Server #1". `container_name` turns such text into a valid name in a predictable way, so
the plan's body (where the web app sends what the person typed) can be deployed, and a flat
request with an invalid `name` can be refused with the name that would have been accepted.

The fold is lower-case ASCII: accents come off through Unicode decomposition (NFKD), the few
letters that do not decompose are spelled out, and everything else (spaces, `/`, `#`, emoji) is
a separator. Lower case because Docker names are case-sensitive while people are not: "Weather"
and "weather" are the same server to a person, and one spelling avoids two containers that
differ only by case.
"""

from __future__ import annotations

import re
import unicodedata

MAX_LENGTH = 63
CONTAINER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

# Latin letters NFKD leaves whole (they are letters of their own, not letters with marks).
_SPELLED_OUT = str.maketrans({"ß": "ss", "æ": "ae", "Æ": "ae", "œ": "oe", "Œ": "oe", "ø": "o", "Ø": "o",
                              "đ": "d", "Đ": "d", "ł": "l", "Ł": "l", "þ": "th", "Þ": "th", "ð": "d", "Ð": "d",
                              "\u0131": "i"})  # dotless i
_SEPARATORS = re.compile(r"[^a-z0-9_.]+")
_REPEATED = re.compile(r"[-_.]*-[-_.]*")
_UNSTARTABLE = re.compile(r"^[^a-z0-9]+")
_UNFINISHED = re.compile(r"[-_.]+$")


def is_container_name(text: str) -> bool:
    """Whether Docker (and the column's check) accepts `text` as a container name as it is."""
    return CONTAINER_NAME.fullmatch(text) is not None


def container_name(text: str) -> str | None:
    """The container name derived from `text`, or None when nothing usable is left (only spaces,
    punctuation or emoji). Never longer than 63 characters; always starts with a letter or digit
    and never ends with a separator."""
    folded = unicodedata.normalize("NFKD", text.translate(_SPELLED_OUT))
    ascii_only = folded.encode("ascii", "ignore").decode("ascii").lower()
    name = _SEPARATORS.sub("-", ascii_only)
    name = _REPEATED.sub("-", name)  # "a - b" and "a_-_b" read as one separator
    name = _UNSTARTABLE.sub("", name)
    name = _UNFINISHED.sub("", name[:MAX_LENGTH])
    return name or None


def free_name(base: str, taken: set[str], limit: int = 99) -> str | None:
    """The first of `base`, `base-2`, `base-3`... that is not in `taken` (kept within 63 characters),
    or None after `limit` tries."""
    if base not in taken:
        return base
    for n in range(2, limit + 2):
        suffix = f"-{n}"
        candidate = _UNFINISHED.sub("", base[: MAX_LENGTH - len(suffix)]) + suffix
        if candidate not in taken:
            return candidate
    return None
