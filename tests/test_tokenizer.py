"""CLIP BPE with the real OpenAI vocabulary (from the open-clip-torch wheel)."""

import warnings

import numpy as np
import pytest

from jaxdiff.tokenizer import Tokenizer, write_clip_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(write_clip_tokenizer(tmp_path_factory.mktemp("tok")))


def test_known_ids(tok):
    # Published CLIP token ids: 49406/49407 are <|startoftext|>/<|endoftext|>.
    ids = tok(["a photo of a cat", "a dog"])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])
    np.testing.assert_array_equal(ids[1, :4], [49406, 320, 1929, 49407])
    assert (ids[0, 7:] == 49407).all()  # SD 1.x pads with <|endoftext|>
    assert tok.decode(ids[0]) == "a photo of a cat"


def test_case_and_whitespace_are_normalised(tok):
    np.testing.assert_array_equal(tok("A  Photo of a CAT"), tok("a photo of a cat"))


def test_long_prompt_truncated_with_warning(tok):
    with pytest.warns(UserWarning, match="truncated to 77 tokens; dropped"):
        ids = tok("cat " * 100)
    assert ids.shape == (1, 77) and ids[0, -1] == 49407 and ids[0, 0] == 49406
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok("cat " * 75)  # exactly fits: 75 + BOS + EOS


def test_sd2_pads_with_exclamation(tmp_path):
    tok = Tokenizer(write_clip_tokenizer(tmp_path, pad_token="!"))
    ids = tok("a cat")
    np.testing.assert_array_equal(ids[0, :5], [49406, 320, 2368, 49407, 0])


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a CLIP tokenizer folder"):
        Tokenizer(tmp_path)
