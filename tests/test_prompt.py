import json

import pytest

from moss_edge.export.checkpoint import read_token_ids
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.prompt import (TextTokenizer, TokenIds, audio_span, chat_prompt_ids,
                                      expand_audio_spans)
from moss_edge.runtime.sampling import split_thinking

IDS = TokenIds()
A = IDS.audio_token


def test_time_markers_for_ten_seconds():
    span = audio_span(125, IDS)
    d = {str(i): 15 + i for i in range(10)}
    expected = ([A] * 25 + [d["2"]] + [A] * 25 + [d["4"]] + [A] * 25 + [d["6"]] + [A] * 25 + [d["8"]]
                + [A] * 25 + [d["1"], d["0"]])
    assert span == expected
    assert audio_span(24, IDS) == [A] * 24
    assert audio_span(26, IDS) == [A] * 25 + [d["2"]] + [A]


def test_markers_off():
    ids = TokenIds(time_markers=False)
    assert audio_span(125, ids) == [A] * 125


def test_multi_clip_prompt(synthetic_checkpoint):
    ids = read_token_ids(synthetic_checkpoint)
    tok = TextTokenizer.from_dir(synthetic_checkpoint)
    prompt = chat_prompt_ids(tok, "Compare them.", [30, 5], ids)
    assert prompt.count(ids.audio_start) == 2 and prompt.count(ids.audio_token) == 35
    assert ids.digits[2] in prompt  # the 30-token clip passes the 2 s marker
    text = tok.decode(prompt, skip_special=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|audio_bos|>")
    assert text.endswith("<|audio_eos|>\nCompare them.<|im_end|>\n<|im_start|>assistant\n")
    placed = chat_prompt_ids(tok, "First <|audio_bos|><|AUDIO|><|audio_eos|> then <|audio_bos|><|AUDIO|><|audio_eos|>?", [3, 4], ids)
    assert "First <|audio_bos|>" in tok.decode(placed, skip_special=False)


def test_span_count_mismatch_is_a_clear_error():
    with pytest.raises(MossEdgeError, match="1 audio span"):
        expand_audio_spans([1, IDS.audio_start, IDS.audio_end, 2], [10, 10], IDS)
    with pytest.raises(MossEdgeError, match="never close"):
        expand_audio_spans([IDS.audio_start, A], [10], IDS)


def test_ids_from_checkpoint_files(tmp_path):
    (tmp_path / "processor_config.json").write_text(json.dumps({"audio_token_id": 7, "audio_start_id": 8,
                                                                 "audio_end_id": 9, "enable_time_marker": False}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 3, "eos_token_id": 4}))
    ids = read_token_ids(tmp_path)
    assert (ids.audio_token, ids.audio_start, ids.audio_end, ids.time_markers) == (7, 8, 9, False)
    assert ids.stop == [4, 3]
    defaults = read_token_ids(tmp_path / "absent")
    assert defaults.audio_token == 151654 and defaults.stop == [151645, 151643]
    # no processor config: config.json keys, then the tokenizer's added tokens
    (tmp_path / "processor_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"audio_token_id": 11}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": 12, "content": "<|audio_bos|>"}, {"id": 13, "content": "<|audio_eos|>"}, {"id": 14, "content": "<|AUDIO|>"}]}))
    ids = read_token_ids(tmp_path)
    assert (ids.audio_token, ids.audio_start, ids.audio_end) == (11, 12, 13)


def test_vocab_merges_tokenizer(tmp_path):
    vocab = {ch: i for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz")}
    vocab.update({"Ġ": 26, "ab": 27, "<|im_end|>": 28})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"28": {"content": "<|im_end|>", "special": True}}}))
    tok = TextTokenizer.from_dir(tmp_path)
    assert tok.encode("abc<|im_end|>") == [27, 2, 28]
    with pytest.raises(MossEdgeError, match="no tokenizer"):
        TextTokenizer.from_dir(tmp_path / "none")


def test_split_thinking():
    assert split_thinking("<think>hmm, a dog</think>\n\nA dog barks.") == ("hmm, a dog", "A dog barks.")
    assert split_thinking("Just an answer.") == ("", "Just an answer.")
