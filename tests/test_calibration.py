"""Calibration text from every source, cut into windows; the default corpus splits never overlap."""

from __future__ import annotations

import pytest

from hubprune.calibration import CORPORA, default_corpus, load_texts, token_windows
from hubprune.config import CalibrationConfig


def test_default_corpus_splits_are_disjoint_and_real():
    splits = {s: default_corpus("wiki", s) for s in ("calibration", "heldout", "train")}
    assert all(len(docs) > 100 for docs in splits.values())
    assert not set(splits["calibration"]) & set(splits["heldout"])
    assert not set(splits["train"]) & (set(splits["calibration"]) | set(splits["heldout"]))
    with pytest.raises(ValueError, match="unknown corpus 'books'"):
        default_corpus("books")


@pytest.mark.parametrize("corpus", CORPORA)
def test_every_corpus_has_documents_in_every_split(corpus):
    # c4.utf8 holds one document per line with no blank line between: all 118 were one document
    splits = {s: default_corpus(corpus, s) for s in ("calibration", "heldout", "train")}
    assert all(len(docs) >= 10 for docs in splits.values()), {s: len(d) for s, d in splits.items()}
    assert len(splits["train"]) > 5 * len(splits["heldout"])
    long = lambda docs: {d for d in docs if len(d) > 200}  # code repeats short snippets such as "# Apply"
    assert not long(splits["train"]) & long(splits["heldout"])


def test_windows_have_bos_and_fixed_length(tokenizer):
    windows = token_windows(tokenizer, default_corpus("tiny", "calibration"), n_samples=4, seq_len=32)
    assert windows.ids.shape == (4, 32)
    assert (windows.ids[:, 0] == tokenizer.bos_token_id).all()
    assert windows.fingerprint() == token_windows(tokenizer, windows.texts, 4, 32).fingerprint()


def test_sources(tokenizer, tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("Once upon a time there was a cat.")
    assert load_texts(str(tmp_path / "a.txt"))[0] == ["Once upon a time there was a cat."]
    assert load_texts(["one", "two"])[0] == ["one", "two"]
    dataset = datasets.Dataset.from_dict({"text": ["alpha beta", "gamma"], "n": [1, 2]})
    assert load_texts(dataset)[0] == ["alpha beta", "gamma"]
    dataset.save_to_disk(tmp_path / "ds")
    assert load_texts(None, CalibrationConfig(dataset=str(tmp_path / "ds")))[0] == ["alpha beta", "gamma"]
    with pytest.raises(ValueError, match="no column 'body'; its columns are text, n"):
        load_texts(dataset, CalibrationConfig(column="body"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(None, CalibrationConfig(files=[str(tmp_path / "missing.txt")]))
    with pytest.raises(TypeError, match="cannot use a int"):
        load_texts(42)


def test_empty_text_is_refused(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        token_windows(tokenizer, ["", "   \n"], n_samples=4, seq_len=32)


def test_short_text_gives_one_short_window(tokenizer):
    windows = token_windows(tokenizer, ["a tiny story"], n_samples=4, seq_len=64)
    assert windows.ids.shape[0] == 1 and 2 <= windows.ids.shape[1] < 64
