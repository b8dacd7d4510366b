"""Text corpora: Austen (janeaustenr), German and English fortunes, FOLDOC; the real ones when
their Debian packages are installed, the parsers on hand-made files always."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from gapa_bench.data import text
from gapa_bench.data.text import (
    APT_PACKAGES,
    AUSTEN_DIR,
    AUSTEN_ENV,
    AUSTEN_NOVELS,
    FOLDOC_DIR,
    FORTUNES_DE_DIR,
    FORTUNES_EN_DIR,
    FORTUNES_EN_FILES,
    TEXT_SETS,
    austen_cache_dir,
    austen_novels,
    foldoc_entries,
    fortunes_de,
    fortunes_en,
    load_text_set,
    read_fortune_file,
)
from gapa_bench.errors import DataError

_AUSTEN_SUBDIR = Path("usr/lib/R/site-library/janeaustenr")


def _austen_dir() -> Path | None:
    """The janeaustenr folder austen_novels() would read by default, or None."""
    env = os.environ.get(AUSTEN_ENV)
    for folder in [Path(env)] if env else [AUSTEN_DIR, austen_cache_dir()]:
        for base in (folder, folder / _AUSTEN_SUBDIR):
            if (base / "data" / "Rdata.rdx").is_file():
                return base
    return None


_NO_AUSTEN = (
    f"janeaustenr not found in {AUSTEN_DIR} or {austen_cache_dir()} (apt-get download "
    f"r-cran-janeaustenr && dpkg -x r-cran-janeaustenr_*.deb {austen_cache_dir()})"
)
needs_austen = pytest.mark.skipif(_austen_dir() is None, reason=_NO_AUSTEN)
needs_fortunes_de = pytest.mark.skipif(
    not (FORTUNES_DE_DIR / "zitate").is_file(),
    reason=f"German fortunes not installed in {FORTUNES_DE_DIR} (apt-get install -y fortunes-de)",
)
needs_fortunes_en = pytest.mark.skipif(
    not all((FORTUNES_EN_DIR / name).is_file() for name in FORTUNES_EN_FILES),
    reason=f"English fortunes not installed in {FORTUNES_EN_DIR} "
    "(apt-get install -y fortunes fortunes-min)",
)
needs_foldoc = pytest.mark.skipif(
    not (FOLDOC_DIR / "foldoc.index").is_file(),
    reason=f"FOLDOC not installed in {FOLDOC_DIR} (apt-get install -y dict-foldoc)",
)


# ---------------------------------------------------------------- Jane Austen


@pytest.fixture(scope="module")
def novels() -> dict[str, str]:
    if _austen_dir() is None:
        pytest.skip(_NO_AUSTEN)
    pytest.importorskip("rdata")
    return austen_novels()


@needs_austen
def test_six_novels_in_publication_order(novels):
    assert tuple(novels) == AUSTEN_NOVELS
    assert novels["emma"].startswith("EMMA\n")
    assert "Emma Woodhouse, handsome, clever, and rich" in novels["emma"]
    assert "It is a truth universally acknowledged" in novels["prideprejudice"]
    assert "Sir Walter Elliot" in novels["persuasion"]
    assert "Catherine Morland" in novels["northangerabbey"]
    assert "Fanny Price" in novels["mansfieldpark"]
    assert "Elinor" in novels["sensesensibility"]
    for name, body in novels.items():
        assert 400_000 < len(body) < 1_000_000, name
        assert 7_000 < body.count("\n") < 17_000, name  # one line per element of the R vector
        assert "Jane Austen" in body[:100], name


@needs_austen
def test_root_may_be_the_unpacked_deb(tmp_path, novels):
    pytest.importorskip("rdata")
    link = tmp_path / _AUSTEN_SUBDIR
    link.parent.mkdir(parents=True)
    link.symlink_to(_austen_dir(), target_is_directory=True)
    assert austen_novels(tmp_path) == novels


@needs_austen
def test_corrupt_rdb_is_a_data_error(tmp_path):
    pytest.importorskip("rdata")
    source = _austen_dir() / "data"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "Rdata.rdx").write_bytes((source / "Rdata.rdx").read_bytes())
    (tmp_path / "data" / "Rdata.rdb").write_bytes((source / "Rdata.rdb").read_bytes()[:500_000])
    with pytest.raises(DataError, match=r"Rdata\.rdb"):
        austen_novels(tmp_path)


def test_missing_austen_root_names_the_path_and_the_install(tmp_path):
    with pytest.raises(DataError) as info:
        austen_novels(tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message
    assert "apt-get download r-cran-janeaustenr" in message and "dpkg -x" in message


def test_austen_env_overrides_the_default_folders(tmp_path, monkeypatch):
    monkeypatch.setenv(AUSTEN_ENV, str(tmp_path / "env"))
    with pytest.raises(DataError, match="env") as info:
        austen_novels()
    assert str(AUSTEN_DIR) not in str(info.value)


# ---------------------------------------------------------------- fortune files


def test_fortune_file_records_overstrike_and_encoding(tmp_path):
    path = tmp_path / "cookies"
    path.write_bytes(
        b"\n%\nfirst line   \n\tsecond\n\n%\n"  # leading empty record, trailing spaces
        b"%\n"  # empty record
        b"an _\bi_\bt_\ba_\bl_\bi_\bc word, B\bBo\bol\bld\bd, ___\b\b\bone\n"
        b"\t\t-- Someone\n%\n"
        b"last, no closing percent\n"
    )
    assert read_fortune_file(path) == [
        "first line\n\tsecond",
        "an italic word, Bold, one\n\t\t-- Someone",
        "last, no closing percent",
    ]
    latin = tmp_path / "latin"
    latin.write_bytes("Grüße aus Köln\n%\n".encode("latin-1"))
    assert read_fortune_file(latin) == ["Grüße aus Köln"]


def test_fortunes_de_prefers_utf8_skips_dat_and_ascii_art(tmp_path):
    (tmp_path / "witze").write_bytes("Grüße\n%\nnoch einer\n%\n".encode("latin-1"))
    (tmp_path / "witze.u8").write_text("Grüße\n%\nnoch einer\n%\nGrüße\n", encoding="utf-8")
    (tmp_path / "witze.dat").write_bytes(b"\x00\x00\x00\x02%\n")
    (tmp_path / "asciiart").write_text(" /\\_/\\ \n%\n", encoding="utf-8")
    (tmp_path / "zitate").write_text("Erkenne dich selbst.\n\t\t-- Thales\n", encoding="utf-8")
    assert fortunes_de(tmp_path) == ["Grüße", "noch einer", "Erkenne dich selbst.\n\t\t-- Thales"]


def test_missing_fortunes_name_the_path_and_the_package(tmp_path):
    with pytest.raises(DataError, match="fortunes-de") as info:
        fortunes_de(tmp_path / "de")
    assert str(tmp_path / "de") in str(info.value)
    (tmp_path / "fortunes").write_text("one\n%\n", encoding="utf-8")
    with pytest.raises(DataError, match="apt-get install -y fortunes fortunes-min") as info:
        fortunes_en(tmp_path)
    assert str(tmp_path) in str(info.value) and "computers" in str(info.value)


@needs_fortunes_de
def test_real_german_fortunes():
    records = fortunes_de()
    assert 15_000 < len(records) < 25_000
    assert len(set(records)) == len(records)
    words = " ".join(records).split()
    for common in ("und", "der", "die", "nicht", "ist"):
        assert words.count(common) > 1000, common
    assert any("ä" in r or "ö" in r or "ü" in r or "ß" in r for r in records)
    assert not any("\b" in r or "\ufffd" in r for r in records)
    assert all(r.strip() and r == r.strip("\n") for r in records)


@needs_fortunes_en
def test_real_english_fortunes():
    records = fortunes_en()
    assert 12_000 < len(records) < 20_000
    assert len(set(records)) == len(records)
    words = " ".join(records).split()
    for common in ("the", "and", "of", "is"):
        assert words.count(common) > 5000, common
    assert not any("\b" in r for r in records)
    assert not any("-- Jane Austen" in r or "-- J. Austen" in r for r in records)


# ---------------------------------------------------------------- FOLDOC


def _dictd_number(value: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = digits[value % 64]
    while value >= 64:
        value //= 64
        out = digits[value % 64] + out
    return out


def test_foldoc_format_byte_offsets_aliases_and_header(tmp_path):
    chunks = [
        "00-database-info\n   This file was made by hand.\n",
        "café\n\n   <jargon> A place serving {coffee}; see {bar}.\n\n   (2020-01-01)\n\n",
        "lambda\n\n   <mathematics> Greek letter λ, see {lambda-calculus}.\n",
    ]
    blob, spans = b"", []
    for chunk in chunks:
        data = chunk.encode("utf-8")
        spans.append((len(blob), len(data)))
        blob += data
    index = [("00-database-info", *spans[0]), ("cafe", *spans[1]), ("café", *spans[1]),
             ("lambda", *spans[2])]  # fmt: skip
    (tmp_path / "foldoc.index").write_text(
        "".join(f"{h}\t{_dictd_number(o)}\t{_dictd_number(n)}\n" for h, o, n in index),
        encoding="utf-8",
    )
    (tmp_path / "foldoc.dict.dz").write_bytes(gzip.compress(blob))
    assert foldoc_entries(tmp_path) == [
        "café\n\n<jargon> A place serving coffee; see bar.\n\n(2020-01-01)",
        "lambda\n\n<mathematics> Greek letter λ, see lambda-calculus.",
    ]
    (tmp_path / "foldoc.dict.dz").write_bytes(gzip.compress(blob[:-10]))
    with pytest.raises(DataError, match="past the end"):
        foldoc_entries(tmp_path)


def test_missing_foldoc_names_the_path_and_the_package(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dict-foldoc") as info:
        foldoc_entries(tmp_path)
    assert str(tmp_path) in str(info.value)


@needs_foldoc
def test_real_foldoc():
    entries = foldoc_entries()
    assert 10_000 < len(entries) < 20_000
    assert len(set(entries)) == len(entries)
    assert any(e.startswith("lambda-calculus\n\n<mathematics>") for e in entries)
    assert not any("{" in e or "}" in e or e.startswith("00-database") for e in entries)


# ---------------------------------------------------------------- registry


def test_registry_lists_every_set_and_package():
    assert set(TEXT_SETS) == {"austen", "fortunes-de", "fortunes-en", "foldoc"}
    assert {s.package for s in TEXT_SETS.values()} <= set(APT_PACKAGES)
    assert all(s.description for s in TEXT_SETS.values())
    with pytest.raises(DataError, match="unknown text set 'klingon'"):
        load_text_set("klingon")


@needs_fortunes_de
def test_load_text_set_calls_the_loader():
    assert load_text_set("fortunes-de") == fortunes_de()
    assert text.TEXT_SETS["fortunes-de"].loader is fortunes_de
