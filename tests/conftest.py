import json
from pathlib import Path

import numpy as np
import pytest

from moss_edge import bundled_audio
from moss_edge.runtime.prompt import TokenIds

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-moss-audio"


@pytest.fixture(scope="session")
def upstream():
    """The tiny checkpoint written by upstream code and the outputs it recorded."""
    ref = json.loads((FIXTURE / "reference.json").read_text())
    ids = TokenIds(audio_token=ref["ids"]["audio_token_id"], audio_start=ref["ids"]["audio_start_id"],
                   audio_end=ref["ids"]["audio_end_id"], stop=[1003])
    return {"checkpoint": FIXTURE / "checkpoint", "npz": dict(np.load(FIXTURE / "reference.npz")),
            "json": ref, "ids": ids, "audio": bundled_audio(ref["audio"])}


@pytest.fixture(scope="session")
def synthetic_checkpoint(tmp_path_factory):
    """bf16, sharded, out_proj present, num_heads * head_dim != hidden, 2 of 3 taps injected."""
    from moss_edge.export.synthetic import preset, write_synthetic_checkpoint

    return write_synthetic_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-bf16", preset("tiny"),
                                      dtype="bf16", shard_mb=0)


def rel_err(x, ref) -> float:
    """max-abs error relative to the reference's max-abs."""
    return float(np.abs(np.asarray(x, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="session")
def fixture_artifact(upstream, tmp_path_factory):
    """The upstream fixture exported to ONNX (fp32), with its custom token ids."""
    from moss_edge.export.onnx_export import export_artifact

    return export_artifact(upstream["checkpoint"], tmp_path_factory.mktemp("art") / "fixture", verify_steps=8,
                           token_ids=upstream["ids"], log=lambda m: None)


@pytest.fixture(scope="session")
def synthetic_artifact(synthetic_checkpoint, tmp_path_factory):
    from moss_edge.export.onnx_export import export_artifact

    return export_artifact(synthetic_checkpoint, tmp_path_factory.mktemp("art") / "synthetic", verify_steps=8,
                           log=lambda m: None)


@pytest.fixture(scope="session")
def packaged_artifacts(tmp_path_factory):
    """The packaged sound-event model exported (fp32) and quantized (INT4 AWQ), unverified."""
    from moss_edge.demo import TRAINED
    from moss_edge.export.onnx_export import export_artifact
    from moss_edge.quantize.artifact import quantize_artifact
    from moss_edge.quantize.recipe import load_recipe

    root = tmp_path_factory.mktemp("packaged")
    fp32 = export_artifact(TRAINED, root / "fp32", verify_steps=0, log=lambda m: None)
    return {"fp32": fp32,
            "int4": quantize_artifact(fp32, root / "int4", load_recipe("int4-awq"), verify=False, log=lambda m: None).path}
