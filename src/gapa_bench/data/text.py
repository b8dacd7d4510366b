"""Text corpora for the language-model benchmark, read offline from Debian packages.

In distribution, Jane Austen's six novels from ``r-cran-janeaustenr`` (the R package
``janeaustenr``, Project Gutenberg texts, one line per element of a character vector). They
are stored in R's lazy-load format, ``data/Rdata.rdx`` and ``data/Rdata.rdb``, which is read
here with the PyPI package ``rdata``; R itself is not needed, so unpacking the ``.deb`` is
enough::

    apt-get download r-cran-janeaustenr
    dpkg -x r-cran-janeaustenr_*.deb ~/.cache/gapa/text/janeaustenr

(``apt-get install r-cran-janeaustenr`` works too but pulls in R.)

Out of distribution, three sets of natural text that are not 19th-century English novels:

- German fortune cookies from ``fortunes-de`` (``/usr/share/games/fortunes/de/``): quotations,
  jokes, proverbs, IRC quotes, recipes; the ASCII-art file is left out.
- English fortune cookies from ``fortunes`` and ``fortunes-min`` (``/usr/share/games/fortunes/``):
  modern quips, quotations and jokes; ASCII art and the few quotations attributed to Austen are
  left out.
- Entries of FOLDOC, the Free On-line Dictionary of Computing, from ``dict-foldoc``
  (``/usr/share/dictd/foldoc.dict.dz``): modern technical English prose.

Fortune files are records separated by lines holding only ``%``; terminal overstriking
(``_\\bX`` underlining, ``X\\bX`` bold) is removed. :data:`TEXT_SETS` lists every set with its
loader and package, :data:`APT_PACKAGES` the Debian packages to install.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from gapa.errors import MissingDependencyError

from ..errors import DataError

__all__ = [
    "APT_PACKAGES",
    "AUSTEN_DIR",
    "AUSTEN_ENV",
    "AUSTEN_NOVELS",
    "FOLDOC_DIR",
    "FORTUNES_DE_DIR",
    "FORTUNES_EN_DIR",
    "FORTUNES_EN_FILES",
    "TEXT_SETS",
    "TextSet",
    "austen_cache_dir",
    "austen_novels",
    "foldoc_entries",
    "fortunes_de",
    "fortunes_en",
    "load_text_set",
    "read_fortune_file",
]

AUSTEN_DIR = Path("/usr/lib/R/site-library/janeaustenr")
"""Where ``apt-get install r-cran-janeaustenr`` puts the R package."""

AUSTEN_ENV = "GAPA_JANEAUSTENR_DIR"
"""Environment variable naming the ``janeaustenr`` folder; when set, it is the only place read."""

AUSTEN_NOVELS = (
    "sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
    "persuasion",
)  # fmt: skip
"""The object names of the six novels in ``janeaustenr``, in order of publication."""

FORTUNES_DE_DIR = Path("/usr/share/games/fortunes/de")
FORTUNES_EN_DIR = Path("/usr/share/games/fortunes")
FOLDOC_DIR = Path("/usr/share/dictd")

FORTUNES_EN_FILES = (
    "art", "computers", "cookie", "debian", "definitions", "disclaimer", "drugs", "education",
    "ethnic", "food", "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law", "linux",
    "linuxcookie", "literature", "love", "magic", "medicine", "men-women", "miscellaneous",
    "news", "paradoxum", "people", "perl", "pets", "platitudes", "politics", "pratchett",
    "riddles", "science", "songs-poems", "sports", "startrek", "tao", "translate-me", "wisdom",
    "work", "zippy",
)  # fmt: skip
"""The English fortune files read (those of ``fortunes`` 1.99.1 and ``fortunes-min`` but
``ascii-art``); fixed because other packages add their own files to the same folder."""

_FORTUNES_DE_SKIP = frozenset({"asciiart"})
_AUSTEN_ATTRIBUTION = re.compile(r"--\s*(?:Jane|J\.)\s+Austen\b")
_AUSTEN_SUBDIR = Path("usr/lib/R/site-library/janeaustenr")
_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_RDATA_PIP = "python -m pip install rdata"


def _apt(package: str) -> str:
    return f"apt-get install -y {package}"


def austen_cache_dir() -> Path:
    """The folder the Makefile unpacks ``r-cran-janeaustenr`` into (``dpkg -x``)."""
    return Path.home() / ".cache" / "gapa" / "text" / "janeaustenr"


def austen_novels(root: str | Path | None = None) -> dict[str, str]:
    """Jane Austen's six novels from ``janeaustenr``: name -> full text, lines joined by ``\\n``.

    Parameters
    ----------
    root : str or Path, optional
        The ``janeaustenr`` folder (holding ``data/Rdata.rdx``), or a folder into which the
        ``.deb`` was unpacked. By default ``$GAPA_JANEAUSTENR_DIR`` if set, else the first of
        :data:`AUSTEN_DIR` and the unpacked copy under :func:`austen_cache_dir` that exists.

    Returns
    -------
    dict of str to str
        Keyed by :data:`AUSTEN_NOVELS`, in that order.

    Raises
    ------
    DataError
        If no folder holds the data (the message names the folders and the install commands)
        or the files are malformed.
    MissingDependencyError
        If the PyPI package ``rdata`` is not installed.
    """
    if root is not None:
        candidates = [Path(root)]
    elif os.environ.get(AUSTEN_ENV):
        candidates = [Path(os.environ[AUSTEN_ENV])]
    else:
        candidates = [AUSTEN_DIR, austen_cache_dir()]
    data = None
    for folder in candidates:
        for base in (folder, folder / _AUSTEN_SUBDIR):
            if (base / "data" / "Rdata.rdx").is_file():
                data = base / "data" / "Rdata"
                break
        if data is not None:
            break
    if data is None:
        tried = ", ".join(repr(str(c)) for c in candidates)
        raise DataError(
            f"Jane Austen novels (janeaustenr) not found in {tried}: no data/Rdata.rdx. Unpack "
            f"the Debian package without R: `apt-get download r-cran-janeaustenr && dpkg -x "
            f"r-cran-janeaustenr_*.deb {austen_cache_dir()}`, or `{_apt('r-cran-janeaustenr')}` "
            f"(pulls in R); or set {AUSTEN_ENV} (or pass root=) to the janeaustenr folder."
        )
    objects = _read_lazyload(data)
    missing = [name for name in AUSTEN_NOVELS if name not in objects]
    if missing:
        raise DataError(f"{str(data) + '.rdx'!r} lacks the novels {', '.join(missing)}.")
    novels = {}
    for name in AUSTEN_NOVELS:
        lines = objects[name]
        if getattr(lines, "ndim", None) != 1:
            raise DataError(f"{str(data) + '.rdb'!r}: {name} is not a character vector.")
        novels[name] = "\n".join("" if line is None else str(line) for line in lines)
    return novels


def fortunes_de(root: str | Path | None = None) -> list[str]:
    """The German fortune cookies of ``fortunes-de``, one string per record.

    Every fortune file in ``root`` (default :data:`FORTUNES_DE_DIR`) is read, in name order,
    but ``asciiart``; the UTF-8 ``.u8`` variant is preferred where both exist. Repeated records
    are kept once.

    Raises
    ------
    DataError
        If the folder holds no fortune files; the message names it and the package.
    """
    folder = Path(root) if root is not None else FORTUNES_DE_DIR
    stems = set()
    if folder.is_dir():
        for path in folder.iterdir():
            if path.suffix == ".dat" or not path.is_file():
                continue
            stems.add(path.name.removesuffix(".u8"))
    stems -= _FORTUNES_DE_SKIP
    if not stems:
        raise DataError(
            f"German fortunes not found in {str(folder)!r}; install them with "
            f"`{_apt('fortunes-de')}`."
        )
    records = []
    for stem in sorted(stems):
        utf8 = folder / f"{stem}.u8"
        records += read_fortune_file(utf8 if utf8.is_file() else folder / stem)
    return list(dict.fromkeys(records))


def fortunes_en(root: str | Path | None = None) -> list[str]:
    """The English fortune cookies of ``fortunes`` and ``fortunes-min``, one string per record.

    The files :data:`FORTUNES_EN_FILES` are read from ``root`` (default
    :data:`FORTUNES_EN_DIR`) in that order; repeated records are kept once, and those attributed
    to Jane Austen are dropped, as she is the in-distribution author.

    Raises
    ------
    DataError
        If any of the files is missing; the message names the folder and the packages.
    """
    folder = Path(root) if root is not None else FORTUNES_EN_DIR
    missing = [name for name in FORTUNES_EN_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(
            f"English fortunes not found in {str(folder)!r} (missing {', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); install them with "
            f"`{_apt('fortunes fortunes-min')}`."
        )
    records = []
    for name in FORTUNES_EN_FILES:
        records += read_fortune_file(folder / name)
    return [r for r in dict.fromkeys(records) if not _AUSTEN_ATTRIBUTION.search(r)]


def foldoc_entries(root: str | Path | None = None) -> list[str]:
    """The entries of FOLDOC (``dict-foldoc``), one string per entry, in dictionary order.

    Each entry is its headword line, a blank line and the definition, dedented; the braces
    marking cross-references (``{like this}``) are removed. Entries reached through several
    headwords (or repeated) appear once; the ``00-database-*`` header entries are dropped.

    Raises
    ------
    DataError
        If ``foldoc.index`` or ``foldoc.dict.dz`` is missing from ``root`` (default
        :data:`FOLDOC_DIR`) or the two do not match.
    """
    folder = Path(root) if root is not None else FOLDOC_DIR
    index = folder / "foldoc.index"
    dicts = [p for p in (folder / "foldoc.dict.dz", folder / "foldoc.dict") if p.is_file()]
    if not index.is_file() or not dicts:
        raise DataError(
            f"FOLDOC not found in {str(folder)!r} (needs foldoc.index and foldoc.dict.dz); "
            f"install it with `{_apt('dict-foldoc')}`."
        )
    try:
        raw = dicts[0].read_bytes()
        blob = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        spans = set()
        for line in index.read_text(encoding="utf-8").splitlines():
            head, offset, length = line.split("\t")
            if not head.startswith("00-database"):
                spans.add((_dictd_number(offset), _dictd_number(length)))
        entries = []
        for offset, length in sorted(spans):  # byte offsets into the uncompressed file
            if offset + length > len(blob):
                raise ValueError(f"the index points past the end of {dicts[0].name}")
            text = blob[offset : offset + length].decode("utf-8")
            head, _, body = text.strip("\n").partition("\n")
            body = textwrap.dedent(body).strip("\n")
            entries.append(re.sub(r"[{}]", "", f"{head.strip()}\n\n{body}".strip()))
    except (OSError, EOFError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"could not read FOLDOC from {str(folder)!r}: {exc}") from exc
    return list(dict.fromkeys(entries))


def read_fortune_file(path: str | Path) -> list[str]:
    """The records of one fortune file: text between lines holding only ``%``.

    Decoded as UTF-8 (Latin-1 if that fails); overstriking, trailing spaces and surrounding
    blank lines are removed, and empty records dropped.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"could not read fortune file {str(path)!r}: {exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    while "\b" in text:  # "_\bX" and "X\bX" render as X; "__\b\bXY" unwinds pair by pair
        shorter = re.sub("[^\b\n]\b", "", text)
        text = shorter if shorter != text else text.replace("\b", "")
    records, lines = [], []
    for line in [*text.splitlines(), "%"]:
        if line.strip() == "%":
            record = "\n".join(lines).strip("\n")
            if record.strip():
                records.append(record)
            lines = []
        else:
            lines.append(line.rstrip())
    return records


class TextSet(NamedTuple):
    """One corpus of the benchmark: its loader (documents as strings), Debian package, summary."""

    loader: Callable[[], list[str]]
    package: str
    description: str


def _austen_documents() -> list[str]:
    return list(austen_novels().values())


TEXT_SETS: dict[str, TextSet] = {
    "austen": TextSet(
        _austen_documents, "r-cran-janeaustenr",
        "Jane Austen's six novels (in distribution), one document per novel",
    ),
    "fortunes-de": TextSet(
        fortunes_de, "fortunes-de", "German fortune cookies: quotations, jokes, proverbs"
    ),
    "fortunes-en": TextSet(
        fortunes_en, "fortunes", "English fortune cookies: modern quips, quotations, jokes"
    ),
    "foldoc": TextSet(
        foldoc_entries, "dict-foldoc", "FOLDOC computing dictionary entries: technical English"
    ),
}  # fmt: skip
"""Name -> :class:`TextSet`; ``austen`` is the in-distribution set, the others are shifted."""

APT_PACKAGES = ("r-cran-janeaustenr", "fortunes-de", "fortunes", "fortunes-min", "dict-foldoc")
"""Every Debian package the text sets need (``r-cran-janeaustenr`` may be unpacked instead)."""


def load_text_set(name: str) -> list[str]:
    """The documents of the set ``name`` of :data:`TEXT_SETS`."""
    if name not in TEXT_SETS:
        raise DataError(f"unknown text set {name!r}; known: {', '.join(TEXT_SETS)}.")
    return TEXT_SETS[name].loader()


def _dictd_number(digits: str) -> int:
    """A dictd index number: base 64, most significant digit first."""
    value = 0
    for char in digits:
        value = value * 64 + _DICTD_DIGITS.index(char)
    return value


def _read_lazyload(stem: Path) -> dict[str, object]:
    """The objects of an R lazy-load database ``stem.rdx`` / ``stem.rdb``, converted by rdata.

    The ``.rdx`` is a serialized R list whose ``variables`` give each object's ``[offset,
    length]`` in the ``.rdb``; a record there is a 4-byte big-endian length of the serialized
    object followed by the object compressed with zlib, or (``compressed`` 2 or 3) a type byte
    (``2`` bzip2, ``Z`` xz, ``0`` none) and the bytes.
    """
    try:
        import rdata
    except ImportError as exc:
        raise MissingDependencyError(
            f"reading the janeaustenr data needs the optional package rdata: `{_RDATA_PIP}`."
        ) from exc

    def parse(raw: bytes) -> object:
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    rdx, rdb = stem.with_suffix(".rdx"), stem.with_suffix(".rdb")
    try:
        index = parse(rdx.read_bytes())
        variables = {str(k): v for k, v in index["variables"].items()}
        compressed = int(index["compressed"][0]) if "compressed" in index else 1
        blob = rdb.read_bytes()
    except Exception as exc:  # rdata raises various errors on malformed input
        raise DataError(f"could not read the R lazy-load index {str(rdx)!r}: {exc}") from exc
    objects = {}
    for name, (offset, length) in variables.items():
        record = blob[int(offset) : int(offset) + int(length)]
        try:
            size = int.from_bytes(record[:4], "big")
            if compressed in (2, 3):
                unpack = {b"2": bz2.decompress, b"Z": lzma.decompress, b"0": bytes}[record[4:5]]
                raw = unpack(record[5:])
            else:
                raw = zlib.decompress(record[4:])
            if len(raw) != size:
                raise ValueError(f"{len(raw)} bytes unpacked, the record says {size}")
            objects[name] = parse(raw)
        except Exception as exc:
            raise DataError(f"{str(rdb)!r}: could not read the object {name!r}: {exc}") from exc
    return objects
