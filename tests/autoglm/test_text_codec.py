"""autoglm.text_codec / autoglm.detokenizer against transformers' own tokenizer on tiny trained tokenizers:
encoding, whole-text decoding, prompt continuations and streams that never split a UTF-8 character."""

import numpy as np
import pytest

from autoglm.detokenizer import DecodeTable
from autoglm.text_codec import (EncodeError, TextCodec, bytes_to_unicode, is_language_model, is_text_classifier,
                                token_bytes)
from tests.autoglm._tokenizers import BYTES, classifier_metadata, lm_metadata, transformers_tokenizer

STYLES = ["gpt2", "llama"]
TEXTS = ["Hello world", "  two spaces", "café 😀🎉 日本語 テキスト", "鑫 unseen 𝄞 chars ﷽", "x"]


def reference(style):
    return TextCodec.from_metadata(lm_metadata(style)), transformers_tokenizer(style)


def random_ids(codec, rng, n):
    """Token ids that form valid UTF-8 once decoded whole: any token, but byte-fallback pieces only as
    the complete bytes of one character (transformers turns an unfinished byte run into one U+FFFD per byte)."""
    plain = [i for i in range(codec.vocab_size) if codec._tokenizer.id_to_token(i) not in BYTES]
    ids = []
    while len(ids) < n:
        if rng.random() < 0.2:
            ids += codec.encode(rng.choice(["é", "😀", "鑫", "𝄞"]), special_tokens=False).tolist()[-4:]
        else:
            ids.append(int(rng.choice(plain)))
    return ids


@pytest.mark.parametrize("style", STYLES)
def test_encoding_matches_transformers_with_its_special_tokens(style):
    codec, tok = reference(style)
    for text in TEXTS:
        assert codec.encode(text).tolist() == tok(text)["input_ids"]
        assert codec.encode(text, special_tokens=False).tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert (codec.encode("hi")[0] == tok.bos_token_id) == (style == "llama")  # Llama's BOS, as transformers adds it


@pytest.mark.parametrize("style", STYLES)
def test_decoding_random_ids_matches_transformers(style):
    codec, tok = reference(style)
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 40):
        for _ in range(30):
            ids = random_ids(codec, rng, n)
            assert codec.decode(ids) == tok.decode(ids, skip_special_tokens=True), ids


def test_byte_level_decoding_of_any_ids_matches_transformers_even_invalid_utf8():
    # not byte fallback: transformers marks an unfinished byte run there with one U+FFFD per byte
    codec, tok = reference("gpt2")
    rng = np.random.default_rng(1)
    for _ in range(100):
        ids = rng.integers(0, codec.vocab_size, 12).tolist()
        assert codec.decode(ids) == tok.decode(ids, skip_special_tokens=True), ids


@pytest.mark.parametrize("style", STYLES)
def test_a_continuation_is_what_transformers_decodes_after_the_prompt(style):
    codec, tok = reference(style)
    rng = np.random.default_rng(2)
    for text in TEXTS:
        prompt = codec.encode(text).tolist()
        for _ in range(20):
            generated = random_ids(codec, rng, int(rng.integers(1, 12)))
            stream = codec.table.stream(prompt)
            text_out = "".join(stream.push(i) for i in generated) + stream.flush()
            whole = tok.decode(prompt + generated, skip_special_tokens=True)
            assert text_out == whole[len(tok.decode(prompt, skip_special_tokens=True)):]


@pytest.mark.parametrize("style", STYLES)
def test_a_stream_never_emits_part_of_a_character(style):
    codec, _ = reference(style)
    for text in ["😀🎉 日本語", "鑫𝄞﷽ and é"]:
        ids = codec.encode(text).tolist()
        stream = codec.table.stream()
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == text
        assert all("\ufffd" not in p for p in pieces)
        assert len([p for p in pieces if p]) < len(ids)  # some characters did span several tokens


def test_an_unfinished_character_becomes_one_replacement_at_the_end():
    table = DecodeTable((b"a", "😀".encode()[:2], "😀".encode()[2:]))
    stream = table.stream()
    assert [stream.push(0), stream.push(1)] == ["a", ""] and stream.flush() == "\ufffd"
    stream = table.stream()
    assert [stream.push(1), stream.push(2)] == ["", "😀"]


def test_the_llama_decoder_strips_the_first_space_of_the_whole_text_only():
    codec, tok = reference("llama")
    ids = codec.encode("the fox jumps", special_tokens=False).tolist()
    assert codec.decode(ids) == tok.decode(ids) == "the fox jumps"
    continuations = []
    for cut in range(1, len(ids)):  # after a prompt with text, the continuation keeps its space
        stream = codec.table.stream(ids[:cut])
        continuations.append("".join(stream.push(i) for i in ids[cut:]))
        assert continuations[-1] == tok.decode(ids)[len(tok.decode(ids[:cut])):]
    assert any(c.startswith(" ") for c in continuations)


def test_charlm_tables_come_from_itos_and_unknown_characters_are_refused():
    codec = TextCodec.from_metadata({"itos": ["a", "é", "\n"], "block_size": 4})
    assert codec.encode("aé\n").tolist() == [0, 1, 2] and codec.decode([1, 0, 2]) == "éa\n"
    assert token_bytes({"itos": ["a", "é"]}) == [b"a", "é".encode()] and not codec.eos_ids
    with pytest.raises(EncodeError, match=r"'qz' are not in the model's vocabulary of 3"):
        codec.encode("qaz")


def test_the_table_travels_as_json_and_pads_to_the_model_vocabulary():
    table = TextCodec.from_metadata(lm_metadata("llama")).table
    again = DecodeTable.from_json(table.to_json())
    assert again == table and again.strip_leading == 1 and again.eos_ids == {2}
    assert len(table.padded(len(table) + 7)) == len(table) + 7
    with pytest.raises(ValueError, match="do not belong together"):
        table.padded(len(table) - 1)


def test_gpt2_byte_alphabet_covers_every_byte_once():
    alphabet = bytes_to_unicode()
    assert sorted(alphabet) == list(range(256)) and len(set(alphabet.values())) == 256
    assert alphabet[ord(" ")] == "Ġ"


def test_classifier_batches_match_transformers_truncation_and_padding():
    codec, tok = TextCodec.from_metadata(classifier_metadata()), transformers_tokenizer("bert")
    texts = ["the quick brown fox jumps over the lazy dog", "hi", "café"]
    ids, mask = codec.encode_batch(texts, 6)
    want = tok(texts, truncation=True, max_length=6, padding=True)
    assert ids.tolist() == want["input_ids"] and mask.tolist() == want["attention_mask"]


def test_a_tokenizer_saved_with_truncation_or_padding_still_encodes_whole_prompts():
    meta = lm_metadata("gpt2")
    meta = {**meta, "tokenizer": {**meta["tokenizer"], "truncation": {"direction": "Right", "max_length": 2,
                                                                      "strategy": "LongestFirst", "stride": 0},
                                  "padding": {"strategy": {"Fixed": 40}, "direction": "Right", "pad_to_multiple_of":
                                              None, "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"}}}
    codec, tok = TextCodec.from_metadata(meta), transformers_tokenizer("gpt2")
    assert codec.encode("Hello world").tolist() == tok("Hello world")["input_ids"]


def test_kinds_of_metadata():
    lm, cls = lm_metadata("gpt2"), classifier_metadata()
    assert is_language_model(lm) and not is_text_classifier(lm)
    assert is_text_classifier(cls) and not is_language_model(cls)
    assert is_language_model({"itos": ["a"], "block_size": 2}) and not is_language_model({"classes": ["0"]})
