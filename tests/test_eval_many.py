"""`moss-edge eval-many` (issue 17): two artifacts over generated clips on a local Ray with two
actors each; every answer must be what Pipeline.generate gives. Needs the `scale` extra (Ray)."""

import json

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("ray", reason="the scale extra (ray[data]) is not installed")

from moss_edge.cli import main  # noqa: E402
from moss_edge.runtime.audio import SAMPLE_RATE  # noqa: E402
from moss_edge.runtime.errors import MossEdgeError  # noqa: E402
from moss_edge.runtime.pipeline import Pipeline  # noqa: E402
from moss_edge.sound_events.task import make_example, normalise  # noqa: E402


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(77)
    lines = []
    for n in range(40):
        example = make_example(rng)
        sf.write(folder / f"clip{n:02d}.wav", example.wave, SAMPLE_RATE)
        lines.append(json.dumps({"audio": f"clip{n:02d}.wav", "prompt": example.question, "expected": example.answer}))
    (folder / "items.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_eval_many_on_ray_equals_sequential_generate(packaged_artifacts, clips, tmp_path, capsys):
    arts = [packaged_artifacts["fp32"], packaged_artifacts["int4"]]
    out = tmp_path / "results"
    assert main(["eval-many", *map(str, arts), "--items", str(clips / "items.jsonl"), "-o", str(out), "--actors", "2",
                 "--max-new-tokens", "32"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 80 and summary["actors"] == 2
    for art in arts:
        pipe = Pipeline.load(art)
        mine = sorted((r for r in rows if r["artifact"] == str(art)), key=lambda r: r["index"])
        for row in mine:
            want = pipe.generate(row["audio"], row["prompt"], max_new_tokens=32)
            assert (row["answer"], row["generated_tokens"]) == (want.text, len(want.tokens)), row["audio"]
        s = summary["artifacts"][str(art)]
        assert s["clips"] == 40 and s["clips_per_s"] > 0
        assert s["exact_match"] == sum(normalise(r["answer"]) == normalise(r["expected"]) for r in mine) / 40
    assert summary["artifacts"][str(arts[0])]["agreement_with_first"] == 1.0


def test_eval_many_refuses_bad_items(packaged_artifacts, clips, tmp_path, capsys):
    from moss_edge.evaluate_many import read_items

    with pytest.raises(MossEdgeError, match="--prompt"):
        read_items(clips, None)
    assert len(read_items(clips, "What happens?")) == 40
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"audio": "missing.wav", "prompt": "x"}\n')
    with pytest.raises(MossEdgeError, match="not found"):
        read_items(bad, None)
    bad.write_text("not json\n")
    assert main(["eval-many", str(packaged_artifacts["int4"]), "--items", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "line 1 is not JSON" in capsys.readouterr().err
