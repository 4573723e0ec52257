import numpy as np
import pytest

from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.generation import generate_tokens, stream_text
from moss_edge.runtime.prompt import TokenIds
from moss_edge.runtime.sampling import SamplingOptions, next_token

LOGITS = np.array([0.0, 3.0, 2.9, -1.0, 1.0])


def test_greedy_and_degenerate_cuts_pick_the_argmax():
    rng = np.random.default_rng(0)
    assert next_token(LOGITS, SamplingOptions(), rng) == 1
    assert all(next_token(LOGITS, SamplingOptions(temperature=1.0, top_k=1), rng) == 1 for _ in range(20))
    assert all(next_token(LOGITS, SamplingOptions(temperature=1.0, top_p=0.01), rng) == 1 for _ in range(20))


def test_top_k_and_top_p_restrict_the_support():
    rng = np.random.default_rng(0)
    picks = {next_token(LOGITS, SamplingOptions(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert picks == {1, 2}
    picks = {next_token(LOGITS, SamplingOptions(temperature=5.0, top_p=0.5), rng) for _ in range(300)}
    assert picks <= {1, 2, 4} and len(picks) >= 2


class Scripted:
    """An Inference whose logits come from a list, one per call; records what it was fed."""

    def __init__(self, logits, stop=(0,)):
        self.logits, self.fed = iter(logits), []
        self.ids = TokenIds(stop=list(stop))

    def prefill(self, prompt_ids, audio, deepstack=True):
        self.fed.append(("prefill", deepstack))
        return np.array(next(self.logits), float)

    def step(self, token):
        self.fed.append(token)
        return np.array(next(self.logits), float)


def test_stop_and_max_new_tokens():
    model = Scripted([[0, 0, 9], [0, 9, 0], [9, 0, 0]])
    assert list(generate_tokens(model, [], None, SamplingOptions(max_new_tokens=10))) == [2, 1]  # the model's stop id
    assert model.fed == [("prefill", True), 2, 1]
    counting = Scripted([[0, 1.0]] * 5)
    assert list(generate_tokens(counting, [], None, SamplingOptions(max_new_tokens=5), stop_ids=[], deepstack=False)) == [1] * 5
    assert counting.fed == [("prefill", False), 1, 1, 1, 1]  # no step after the last token
    with pytest.raises(MossEdgeError):
        list(generate_tokens(Scripted([LOGITS]), [], None, SamplingOptions(top_p=0)))


def test_stream_text_waits_for_whole_characters():
    pieces = {1: b"caf", 2: b"\xc3", 3: b"\xa9!"}
    decode = lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")  # noqa: E731
    assert list(stream_text(decode, iter([1, 2, 3]))) == ["caf", "é!"]
