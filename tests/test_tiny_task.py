import json
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

import moss_edge
from moss_edge.export.model import MossAudio
from moss_edge.export.onnx_export import export_artifact
from moss_edge.export.reference import ReferencePipeline
from moss_edge.export.verify import verify_artifact
from moss_edge.runtime.parity import report_markdown
from moss_edge.runtime.prompt import TextTokenizer, chat_prompt_ids
from moss_edge.sound_events.evaluate import answerer, evaluate, model_and_tokenizer, task_report
from moss_edge.sound_events.task import (CLASSES, SYSTEM, TASKS, Event, build_tokenizer, make_clip, make_example,
                                         normalise, training_questions)
from moss_edge.sound_events.train import Probes, clips_loss, sound_event_config, token_ids, token_targets, train_tiny


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


def test_clips_never_overlap_an_event_of_their_own_class():
    rng = np.random.default_rng(3)
    for _ in range(200):
        _, events = make_clip(rng, 6.0)
        for a in events:
            for b in events:
                if a is not b and a.label == b.label and a.start <= b.start:
                    assert a.start + a.seconds <= b.start


def test_token_targets_mark_time_bins_activity_and_onsets():
    bins, marks = token_targets([Event(2.5, 1.0, "chord"), Event(4.0, 0.5, "low tone")], 100)  # 8 s at 12.5 tokens/s
    c = CLASSES.index("chord")
    assert bins[0] == 0 and bins[5] == 0 and bins[6] == 1 and bins[99] == 15  # token 6 is centred at 0.52 s
    assert np.flatnonzero(marks[:, c]).tolist() == list(range(31, 44))  # centres in [2.5, 3.5)
    assert np.flatnonzero(marks[:, len(CLASSES) + c]).tolist() == [31, 32]
    assert marks.sum() == 13 + 2 + 6 + 2


def test_shared_prefix_loss_equals_full_sequences():
    """Training runs the audio prefix once and continues each question from its KV cache; the
    answer loss must equal the one from whole prompts run one by one."""
    torch.manual_seed(0)
    raw = build_tokenizer()
    tok, ids = TextTokenizer(raw), token_ids(raw)
    model = MossAudio(sound_event_config(64 * math.ceil(raw.get_vocab_size() / 64))).eval()
    clips = [make_clip(np.random.default_rng(i), 5.0) for i in range(2)]
    _, metrics = clips_loss(model, Probes(192), tok, ids, clips, np.random.default_rng(9))
    answer_loss = metrics["answer_loss"]

    ref = ReferencePipeline(model, ids)
    rng, total, count = np.random.default_rng(9), 0.0, 0
    for wave, events in clips:
        features = ref.encode([wave])
        for question, answer in training_questions(wave, events, rng):
            prompt = chat_prompt_ids(tok, question, features.clip_tokens, ids, SYSTEM)
            target = tok.encode(answer) + [ids.stop[0]]
            logits, _ = ref.forward(prompt + target, features, all_logits=True)
            total += float(F.cross_entropy(torch.from_numpy(logits[len(prompt) - 1 : -1]), torch.tensor(target), reduction="sum"))
            count += len(target)
    assert abs(total / count - answer_loss) < 1e-4 * answer_loss


def test_evaluate_scores_what_the_answers_get_right():
    spaced = evaluate(lambda ex: " ".join(ex.answer.replace(".", " . ").replace(",", " ,").split()), n=40)
    assert spaced["exact_match"] == 1.0 and set(spaced["per_class"].values()) == {1.0}

    first_only = evaluate(lambda ex: ex.answer.split(", ")[0] if ex.task == "list" else "nothing", n=40)
    rng, expected = np.random.default_rng(1234), {}
    for i in range(40):
        ex = make_example(rng, TASKS[i % len(TASKS)])
        for j, e in enumerate(ex.events if ex.task == "list" else []):
            expected.setdefault(e.label, []).append(j == 0)
    assert first_only["per_class"] == {c: float(np.mean(v)) for c, v in sorted(expected.items())}
    assert first_only["per_task"]["count"] == 0.0 and first_only["event_list_exact_match"] < 1.0


def test_tokenizer_digits_and_round_trip():
    tok = build_tokenizer()
    assert [tok.token_to_id(str(d)) for d in range(10)] == list(range(15, 25))
    text = "2.5 rising sweep, 10.0 click train"
    ids = tok.encode(text).ids
    assert tok.token_to_id("<unk>") not in ids
    assert normalise(tok.decode(ids)) == normalise(text)


def test_training_steps_write_a_checkpoint_that_evaluates(tmp_path):
    out = train_tiny(tmp_path / "tiny", max_steps=3, batch=2, log=lambda m: None)
    result = evaluate(answerer(*model_and_tokenizer(out), max_new_tokens=4), n=4)
    assert result["n"] == 4 and 0.0 <= result["exact_match"] <= 1.0
    assert set(result["per_task"]) == set(TASKS)
    assert (out / "model.safetensors").stat().st_size < 25 * 2**20
    resumed = train_tiny(tmp_path / "more", max_steps=1, batch=2, resume=out, log=lambda m: None)
    assert json.loads((resumed / "training.json").read_text())["steps"] == 1


PACKAGED = Path(moss_edge.__file__).parent / "data" / "tiny-moss"


def test_packaged_model_is_small_and_answers_held_out_questions():
    assert (PACKAGED / "model.safetensors").stat().st_size < 25 * 2**20
    result = evaluate(answerer(*model_and_tokenizer(PACKAGED)), n=40)
    assert result["event_list_exact_match"] >= 0.7 and result["exact_match"] >= 0.7, result


def test_verify_reports_task_accuracy_of_the_sound_event_model(tmp_path):
    artifact = export_artifact(PACKAGED, tmp_path / "fp32", verify_steps=4, log=lambda m: None)
    clip = tmp_path / "clip.wav"
    sf.write(clip, make_example(np.random.default_rng(3)).wave, 16000)
    report = verify_artifact(artifact, PACKAGED, audio=[str(clip)], steps=4, evaluate=task_report(8))
    task = report["task"]
    assert task["n"] == 8 and set(task["artifact"]["per_task"]) == set(TASKS)
    assert abs(task["exact_match_drop"]) <= 1 / 8  # fp32 ONNX against fp32 PyTorch: at most one near-tie flips
    assert report["summary"]["task_exact_match"] == task["artifact"]["exact_match"]
    assert "Task accuracy" in report_markdown(report)


def test_demo_answers_with_the_packaged_model_and_replaces_stale_artifacts(tmp_path, capsys):
    from moss_edge.demo import run_demo
    from moss_edge.export.checkpoint import checkpoint_hash

    stale = tmp_path / "artifact-fp32"
    stale.mkdir()
    (stale / "manifest.json").write_text(json.dumps({"source": {"sha256": "0" * 64}}))
    run_demo(str(tmp_path))
    out = capsys.readouterr().out
    assert "made from another checkpoint" in out and "the INT4 answer matches the clip" in out and "**PASSED**" in out
    manifest = json.loads((stale / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == checkpoint_hash(PACKAGED)
