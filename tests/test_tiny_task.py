import json

import numpy as np

from moss_edge.export.tiny_task import CLASSES, TASKS, build_tokenizer, make_example, normalise
from moss_edge.export.train_tiny import answerer, evaluate, train_tiny


def test_examples_are_deterministic_and_consistent():
    a, b = make_example(np.random.default_rng(5)), make_example(np.random.default_rng(5))
    assert a.question == b.question and a.answer == b.answer and np.array_equal(a.wave, b.wave)
    rng = np.random.default_rng(0)
    for task in TASKS * 5:
        ex = make_example(rng, task)
        assert 4.0 <= len(ex.wave) / 16000 <= 16.0 and 1 <= len(ex.events) <= 4
        assert all(e.start % 0.5 == 0 and 0.29 <= e.seconds <= 2.0 and e.label in CLASSES for e in ex.events)
        if task == "list":
            assert ex.answer.split(", ")[0] == f"{ex.events[0].start:.1f} {ex.events[0].label}"
        if task == "count":
            assert ex.answer == str(len(ex.events))


def test_tokenizer_digits_and_round_trip():
    tok = build_tokenizer()
    assert [tok.token_to_id(str(d)) for d in range(10)] == list(range(15, 25))
    text = "2.5 rising sweep, 10.0 click train"
    ids = tok.encode(text).ids
    assert tok.token_to_id("<unk>") not in ids
    assert normalise(tok.decode(ids)) == normalise(text)


def test_training_steps_write_a_checkpoint_that_evaluates(tmp_path):
    out = train_tiny(tmp_path / "tiny", max_steps=3, batch=2, log=lambda m: None)
    result = evaluate(answerer(out, max_new_tokens=4), n=4)
    assert result["n"] == 4 and 0.0 <= result["exact_match"] <= 1.0
    assert set(result["per_task"]) == set(TASKS)
    assert (out / "model.safetensors").stat().st_size < 25 * 2**20
    resumed = train_tiny(tmp_path / "more", max_steps=1, batch=2, resume=out, log=lambda m: None)
    assert json.loads((resumed / "training.json").read_text())["steps"] == 1
