"""ByteTokenizer (round trip, specials) and the Hugging Face adapter behind load_tokenizer."""
import pytest

from fastcur.continual import ByteTokenizer, load_tokenizer
from fastcur.continual.tokenizer import HFTokenizerAdapter


def test_byte_tokenizer_ids_and_round_trip():
    tok = ByteTokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.encode("Ab") == [257, 65, 98]
    assert tok.encode("Ab", add_bos=False, add_eos=True) == [65, 98, 258]
    for text in ["", "Q: Where does Zorvak live?\nA: Plimt", "grüße, 東京 ✓"]:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.decode([256, 72, 256, 105, 258, 256]) == "Hi"  # specials dropped


def test_byte_tokenizer_bad_input():
    with pytest.raises(TypeError, match="must be a str"):
        ByteTokenizer().encode(b"bytes")


def test_load_tokenizer_none_is_bytes_and_missing_dir_is_named(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def _save_word_tokenizer(path, with_pad):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hello": 3, "world": 4, "[pad]": 5}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    extra = {"pad_token": "[pad]"} if with_pad else {}
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", **extra)
    fast.save_pretrained(path)


@pytest.mark.parametrize("with_pad", [True, False])
def test_hf_adapter_has_the_byte_tokenizer_interface(tmp_path, with_pad):
    _save_word_tokenizer(tmp_path, with_pad)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizerAdapter)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.pad_token_id == (5 if with_pad else 1)  # no pad token: pads with EOS
    assert tok.vocab_size == 6
    assert tok.encode("hello world") == [0, 3, 4]
    assert tok.encode("hello world", add_bos=False, add_eos=True) == [3, 4, 1]
    assert tok.decode([0, 3, 4, 1]) == "hello world"
