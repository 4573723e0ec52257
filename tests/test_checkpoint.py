import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from moss_edge.export.checkpoint import load_model
from moss_edge.export.config import load_config
from moss_edge.export.reference import ReferencePipeline
from moss_edge.runtime.audio import load_audio
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.generation import generate_tokens
from moss_edge.runtime.prompt import TextTokenizer, chat_prompt_ids
from moss_edge.runtime.sampling import SamplingOptions


def test_synthetic_layout(synthetic_checkpoint):
    files = sorted(p.name for p in synthetic_checkpoint.iterdir())
    assert "model.safetensors.index.json" in files and "model-00001-of-" in " ".join(files)
    cfg = load_config(synthetic_checkpoint)
    lang = cfg.language
    assert lang.num_attention_heads * lang.head_dim != lang.hidden_size
    assert cfg.audio.has_out_proj
    assert cfg.num_deepstack == 2 < len(cfg.audio.deepstack_encoder_layer_indexes)


def test_bf16_sharded_loads_and_runs(synthetic_checkpoint, upstream):
    bf16 = ReferencePipeline.load(synthetic_checkpoint)
    assert bf16.model.lm_head.weight.dtype == torch.bfloat16
    assert len(bf16.model.deepstack_audio_merger_list) == 2
    fp32 = ReferencePipeline.load(synthetic_checkpoint, dtype=torch.float32)
    wave = load_audio(upstream["audio"])[: 450 * 160]  # 450 mel frames: a full chunk and a tail
    a16, a32 = bf16.encode([wave]), fp32.encode([wave])
    assert a32.taps.shape == (3, 57, 48)  # out_proj applied to the taps too
    assert a32.deepstack.shape == (2, 57, 64)
    # bf16 follows fp32 to bf16 precision, and the activations stay O(1)
    assert np.abs(a16.embeds - a32.embeds).max() < 0.05 * np.abs(a32.embeds).max()
    assert 0.1 < np.abs(a32.embeds).mean() < 10
    tok = TextTokenizer.from_dir(synthetic_checkpoint)
    ids = chat_prompt_ids(tok, "What happens?", a32.clip_tokens, fp32.ids)
    l32, _ = fp32.forward(ids, a32)
    l16, _ = bf16.forward(ids, a16)
    assert np.corrcoef(l32, l16)[0, 1] > 0.99


def _single_file_copy(src, dst):
    """The synthetic checkpoint rewritten as one model.safetensors, for surgery."""
    dst.mkdir()
    tensors = {}
    for shard in src.glob("*.safetensors"):
        tensors.update(load_file(shard))
    for name in ("config.json", "tokenizer.json", "generation_config.json", "processor_config.json"):
        shutil.copy(src / name, dst / name)
    return tensors


def test_loader_errors(synthetic_checkpoint, tmp_path):
    with pytest.raises(MossEdgeError, match="not found"):
        load_model(tmp_path / "nope")
    tensors = _single_file_copy(synthetic_checkpoint, tmp_path / "c")
    ckpt = tmp_path / "c"

    del tensors["language_model.layers.1.mlp.up_proj.weight"]
    tensors["audio_encoder.extra.weight"] = torch.zeros(2)
    tensors["lm_head.weight"] = torch.zeros(10, 64)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(MossEdgeError) as err:
        load_model(ckpt)
    message = str(err.value)
    assert "missing tensors: language_model.layers.1.mlp.up_proj.weight" in message
    assert "unexpected tensors: audio_encoder.extra.weight" in message
    assert "lm_head.weight has shape [10, 64]" in message

    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_audio"}))
    with pytest.raises(MossEdgeError, match="model_type 'qwen2_audio'"):
        load_model(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(MossEdgeError, match="not valid JSON"):
        load_model(ckpt)


def test_missing_shard(synthetic_checkpoint, tmp_path):
    ckpt = tmp_path / "c"
    shutil.copytree(synthetic_checkpoint, ckpt)
    (ckpt / "model-00003-of-" f"{len(list(ckpt.glob('model-*'))):05d}.safetensors").unlink()
    with pytest.raises(MossEdgeError, match="missing"):
        load_model(ckpt)


def test_generation_sampling_is_seeded(synthetic_checkpoint, upstream):
    pipe = ReferencePipeline.load(synthetic_checkpoint, dtype=torch.float32)
    audio = pipe.encode([load_audio(upstream["audio"])[: 200 * 160]])
    ids = chat_prompt_ids(TextTokenizer.from_dir(synthetic_checkpoint), "Describe.", audio.clip_tokens, pipe.ids)
    opts = SamplingOptions(max_new_tokens=12, temperature=1.0, top_k=50, seed=7)
    first = list(generate_tokens(pipe, ids, audio, opts))
    assert first == list(generate_tokens(pipe, ids, audio, opts))
    greedy = list(generate_tokens(pipe, ids, audio, SamplingOptions(max_new_tokens=12)))
    assert first != greedy  # a random model at temperature 1 does not follow argmax for 12 steps
