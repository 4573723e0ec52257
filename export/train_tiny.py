"""Train a small MOSS-Audio (the real architecture) on the time-aware sound-event task, on CPU,
and evaluate any checkpoint or artifact on held-out examples."""

import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moss_edge.export.config import AudioConfig, LanguageConfig, MossAudioConfig
from moss_edge.export.model import MossAudio
from moss_edge.export.synthetic import _init
from moss_edge.export.tiny_task import TASKS, build_tokenizer, make_example, normalise
from moss_edge.runtime.audio import chunk_mels, log_mel
from moss_edge.runtime.prompt import TextTokenizer, TokenIds, chat_prompt_ids

SYSTEM = "You are a helpful assistant."


def tiny_config(vocab_size: int) -> MossAudioConfig:
    return MossAudioConfig(
        audio=AudioConfig(d_model=128, output_dim=128, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=256,
                          downsample_hidden_size=32, deepstack_encoder_layer_indexes=[1, 2, 3]),
        language=LanguageConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                                num_key_value_heads=2, head_dim=32, vocab_size=vocab_size, rope_theta=10000.0,
                                max_position_embeddings=2048),
        adapter_hidden_size=256, deepstack_num_inject_layers=3)


def token_ids(tok) -> TokenIds:
    get = tok.token_to_id
    return TokenIds(audio_token=get("<|AUDIO|>"), audio_start=get("<|audio_bos|>"), audio_end=get("<|audio_eos|>"),
                    stop=[get("<|im_end|>"), get("<|endoftext|>")])


def batch_loss(model: MossAudio, tok: TextTokenizer, ids: TokenIds, examples) -> torch.Tensor:
    """Teacher-forced cross-entropy on the answer tokens (and the closing <|im_end|>)."""
    batch = chunk_mels([log_mel(e.wave) for e in examples], model.cfg.audio.chunk_frames)
    tokens, taps = model.audio_encoder(torch.from_numpy(batch.mel), torch.from_numpy(batch.frames))
    valid = torch.arange(tokens.shape[1])[None, :] < torch.from_numpy(batch.tokens)[:, None]
    embeds, deepstack = model.adapt(tokens[valid], taps[:, valid])
    rows, labels = [], []
    for example, n in zip(examples, batch.clip_tokens):
        prompt = chat_prompt_ids(tok, example.question, [n], ids, SYSTEM)
        answer = tok.encode(example.answer) + [ids.stop[0]]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    length = max(map(len, rows))
    input_ids = torch.tensor([r + [ids.stop[0]] * (length - len(r)) for r in rows])
    target = torch.tensor([lab + [-100] * (length - len(lab)) for lab in labels])
    lm = model.language_model
    audio = input_ids == ids.audio_token
    x = lm.embed_tokens(input_ids)
    x = x.masked_scatter(audio[..., None], embeds)  # rows in example order = row-major order of the mask
    inject = torch.zeros((deepstack.shape[0], *x.shape), dtype=x.dtype)
    inject[:, audio] = deepstack
    empty = [torch.zeros(len(rows), lm.cfg.num_key_value_heads, 0, lm.cfg.head_dim)] * lm.cfg.num_hidden_layers
    hidden, _, _ = lm(x, torch.arange(length)[None].expand(len(rows), -1), empty, empty, inject)
    logits = model.lm_head(hidden[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1), ignore_index=-100)


def train_tiny(out_dir: str | Path, minutes: float = 25.0, max_steps: int | None = None, batch: int = 12,
               lr: float = 2e-3, seed: int = 0, resume: str | Path | None = None, log=print) -> Path:
    """Train until the time or step budget runs out; write a Hugging Face layout checkpoint.
    resume starts from a checkpoint written by an earlier run (a new schedule, new examples)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    raw = build_tokenizer()
    tok, ids = TextTokenizer(raw), token_ids(raw)
    vocab = 64 * math.ceil(raw.get_vocab_size() / 64)
    cfg = tiny_config(vocab)
    model = MossAudio(cfg)
    start_weights = load_file(str(Path(resume) / "model.safetensors")) if resume else None
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(start_weights[name] if start_weights else _init(name, tuple(p.shape), seed))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    start, step, history = time.time(), 0, []
    budget = minutes * 60
    while (max_steps is None or step < max_steps) and time.time() - start < budget:
        progress = min(1.0, (time.time() - start) / budget) if max_steps is None else step / max_steps
        for group in opt.param_groups:  # warm-up, then cosine decay over the budget
            group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        loss = batch_loss(model, tok, ids, [make_example(rng) for _ in range(batch)])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append(loss.item())
        step += 1
        if step % 50 == 0:
            log(f"step {step}  loss {np.mean(history[-50:]):.4f}  {time.time() - start:.0f} s")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k in dict(model.named_parameters())},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_hf_dict()
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    raw.save(str(out / "tokenizer.json"))
    (out / "processor_config.json").write_text(json.dumps({"audio_token_id": ids.audio_token, "audio_start_id": ids.audio_start,
                                                           "audio_end_id": ids.audio_end, "enable_time_marker": True}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": ids.stop[1], "eos_token_id": ids.stop[0]}))
    (out / "training.json").write_text(json.dumps({"steps": step, "seconds": time.time() - start, "batch": batch, "lr": lr,
                                                   "seed": seed, "final_loss": float(np.mean(history[-50:] or [0]))}, indent=2))
    return out


def evaluate(answer, n: int = 300, seed: int = 1234) -> dict:
    """answer(example) -> text. Exact match per task, start-time accuracy ("when" task), and
    per-class accuracy of the event list ("list" task: each event's label and start)."""
    rng = np.random.default_rng(seed)
    per_task, per_class = defaultdict(list), defaultdict(list)
    for i in range(n):
        example = make_example(rng, TASKS[i % len(TASKS)])
        got = normalise(answer(example))
        per_task[example.task].append(got == normalise(example.answer))
        if example.task == "list":
            listed = got.split(", ")
            for j, event in enumerate(example.events):
                per_class[event.label].append(j < len(listed) and listed[j] == f"{event.start:.1f} {event.label}")
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"n": n, "seed": seed, "exact_match": mean([x for v in per_task.values() for x in v]),
            "event_list_exact_match": mean(per_task["list"]), "start_time_accuracy": mean(per_task["when"]),
            "per_task": {t: mean(v) for t, v in per_task.items()}, "per_class": {c: mean(v) for c, v in sorted(per_class.items())}}


def answerer(path: str | Path, no_deepstack: bool = False, no_markers: bool = False, max_new_tokens: int = 48):
    """example -> answer text, from a checkpoint (PyTorch reference, fp32) or an artifact
    (ONNX Runtime), optionally with DeepStack zeroed or time markers off (ablations)."""
    from moss_edge.runtime.generation import generate_tokens
    from moss_edge.runtime.sampling import SamplingOptions

    path = Path(path)
    opts = SamplingOptions(max_new_tokens=max_new_tokens)
    if (path / "manifest.json").is_file():
        from moss_edge.runtime.pipeline import Pipeline

        pipe = Pipeline.load(path)
        pipe.ids.time_markers = not no_markers
        tok = pipe.tokenizer

        def answer(example):
            features = pipe.encode([example.wave])
            if no_deepstack:
                features.deepstack = np.zeros_like(features.deepstack)
            prompt = chat_prompt_ids(tok, example.question, features.clip_tokens, pipe.ids, SYSTEM)
            return tok.decode(list(generate_tokens(lambda: pipe.prefill(prompt, features), pipe.decoder.step,
                                                   opts, pipe.ids.stop)))
        return answer

    from moss_edge.export.reference import ReferencePipeline

    ref = ReferencePipeline.load(path, torch.float32)
    ref.ids.time_markers = not no_markers
    tok = TextTokenizer.from_dir(path)

    def answer(example):
        features = ref.encode([log_mel(example.wave)])
        if no_deepstack:
            features.deepstack = np.zeros_like(features.deepstack)
        prompt = chat_prompt_ids(tok, example.question, features.clip_tokens, ref.ids, SYSTEM)
        return tok.decode(list(ref.generate(prompt, features, opts)))
    return answer
