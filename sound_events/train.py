"""Train a small MOSS-Audio (the real architecture) on the time-aware sound-event task, on CPU."""

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file

from moss_edge.export.config import AudioConfig, LanguageConfig, MossAudioConfig
from moss_edge.export.model import MossAudio
from moss_edge.export.synthetic import _init
from moss_edge.export.writer import write_checkpoint
from moss_edge.runtime.audio import chunk_mels, log_mel
from moss_edge.runtime.audio import TOKENS_PER_SECOND
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.runtime.prompt import SPECIAL_TOKENS, TextTokenizer, TokenIds, chat_prompt_ids
from moss_edge.sound_events.task import CLASSES, SYSTEM, build_tokenizer, make_clip, training_questions


def sound_event_config(vocab_size: int) -> MossAudioConfig:
    """The sizes of the trained sound-event model (not the random test preset `synthetic.preset("tiny")`)."""
    return MossAudioConfig(
        audio=AudioConfig(d_model=128, output_dim=128, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=256,
                          downsample_hidden_size=32, deepstack_encoder_layer_indexes=[1, 2, 3]),
        language=LanguageConfig(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                                num_key_value_heads=2, head_dim=32, vocab_size=vocab_size, rope_theta=10000.0,
                                max_position_embeddings=2048),
        adapter_hidden_size=256, deepstack_num_inject_layers=3)


def token_ids(tok) -> TokenIds:
    get = lambda role: tok.token_to_id(SPECIAL_TOKENS[role])  # noqa: E731
    return TokenIds(audio_token=get("audio_token"), audio_start=get("audio_start"), audio_end=get("audio_end"),
                    stop=[get("turn_end"), get("end_of_text")])


PROBE_LAYER = 1  # the decoder layer whose audio positions the training probes read
TIME_BINS = 32  # 0.5 s bins of a clip of up to 16 s


class Probes(nn.Module):
    """Training-only linear heads on the decoder's audio positions: the 0.5 s bin a token lies in,
    and which classes sound and start there. These dense targets teach the decoder to read the
    time off the markers far sooner than the short answers alone do. They are not saved."""

    def __init__(self, hidden: int):
        super().__init__()
        self.time = nn.Linear(hidden, TIME_BINS)
        self.events = nn.Linear(hidden, 2 * len(CLASSES))


def token_targets(events, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Per audio token: its 0.5 s bin, and [active classes, classes starting here] as 0/1."""
    centre = (np.arange(n_tokens) + 0.5) / TOKENS_PER_SECOND
    bins = np.minimum(centre // 0.5, TIME_BINS - 1).astype(np.int64)
    marks = np.zeros((n_tokens, 2 * len(CLASSES)), dtype=np.float32)
    for e in events:
        c = CLASSES.index(e.label)
        marks[(centre >= e.start) & (centre < e.start + e.seconds), c] = 1
        first = int(e.start * TOKENS_PER_SECOND)  # the token holding the onset, and the next
        marks[first : first + 2, len(CLASSES) + c] = 1
    return bins, marks


def clips_loss(model: MossAudio, probes: Probes, tok: TextTokenizer, ids: TokenIds, clips, rng) -> torch.Tensor:
    """Loss on clips of equal length: the shared prefix (system prompt and audio) runs once per
    clip, then each of its `training_questions` continues from its KV cache, exactly as at
    inference. Teacher-forced cross-entropy on the answers (and <|im_end|>), plus the probes;
    returns (loss to minimise, {answer cross-entropy, time-probe accuracy})."""
    batch = chunk_mels([log_mel(wave) for wave, _ in clips], model.cfg.audio.chunk_frames)
    n = batch.clip_tokens[0]
    if any(c != n for c in batch.clip_tokens):
        raise MossEdgeError(f"the clips of one training step must have equal length; got {batch.clip_tokens} tokens")
    _, _, embeds, deepstack = model.encode_audio(torch.from_numpy(batch.mel), torch.from_numpy(batch.frames),
                                                 torch.from_numpy(batch.tokens))

    lm = model.language_model
    full = chat_prompt_ids(tok, "", [n], ids, SYSTEM)
    prefix = full[: full.index(ids.audio_end) + 1]
    prefix_ids = torch.tensor([prefix] * len(clips))
    audio = prefix_ids == ids.audio_token
    x = lm.embed_tokens(prefix_ids).masked_scatter(audio[..., None], embeds)
    inject = torch.zeros((deepstack.shape[0], *x.shape), dtype=x.dtype)
    inject[:, audio] = deepstack
    probed = []
    hook = lm.layers[PROBE_LAYER].register_forward_hook(lambda module, args, out: probed.append(out[0]))
    empty = [torch.zeros(len(clips), lm.cfg.num_key_value_heads, 0, lm.cfg.head_dim)] * lm.cfg.num_hidden_layers
    _, keys, values = lm(x, torch.arange(len(prefix))[None].expand(len(clips), -1), empty, empty, inject)
    hook.remove()

    rows, labels, per_clip = [], [], []
    for wave, events in clips:
        questions = training_questions(wave, events, rng)
        per_clip.append(len(questions))
        for question, answer in questions:
            prompt = chat_prompt_ids(tok, question, [n], ids, SYSTEM)[len(prefix) :]
            answer_ids = tok.encode(answer) + [ids.stop[0]]
            rows.append(prompt + answer_ids)
            labels.append([-100] * len(prompt) + answer_ids)
    length = max(map(len, rows))
    row_ids = torch.tensor([r + [ids.stop[0]] * (length - len(r)) for r in rows])
    target = torch.tensor([lab + [-100] * (length - len(lab)) for lab in labels])
    positions = torch.arange(len(prefix), len(prefix) + length)[None].expand(len(rows), -1)
    repeat = torch.tensor(per_clip)
    hidden, _, _ = lm(lm.embed_tokens(row_ids), positions, [k.repeat_interleave(repeat, 0) for k in keys],
                      [v.repeat_interleave(repeat, 0) for v in values], torch.zeros(0))
    logits = model.lm_head(hidden[:, :-1])
    answer_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target[:, 1:].reshape(-1), ignore_index=-100)

    bins, marks = zip(*(token_targets(events, n) for _, events in clips))
    at_audio = probed[0][audio]  # row-major: clip by clip, token by token
    time_logits, time_target = probes.time(at_audio), torch.from_numpy(np.concatenate(bins))
    time_loss = F.cross_entropy(time_logits, time_target)
    event_loss = F.binary_cross_entropy_with_logits(probes.events(at_audio), torch.from_numpy(np.concatenate(marks)))
    time_accuracy = (time_logits.argmax(-1) == time_target).float().mean().item()
    return answer_loss + 0.5 * (time_loss + event_loss), {"answer_loss": answer_loss.item(), "time_probe": time_accuracy}


def train_tiny(out_dir: str | Path, minutes: float = 28.0, max_steps: int | None = None, batch: int = 12,
               lr: float = 2e-3, seed: int = 0, resume: str | Path | None = None, log=print) -> Path:
    """Train until the time or step budget runs out; write a Hugging Face layout checkpoint.
    Each step draws `batch` clips of one random length. resume starts from a checkpoint written
    by an earlier run (a new schedule, new examples)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    raw = build_tokenizer()
    tok, ids = TextTokenizer(raw), token_ids(raw)
    vocab = 64 * math.ceil(raw.get_vocab_size() / 64)
    cfg = sound_event_config(vocab)
    model = MossAudio(cfg)
    probes = Probes(cfg.language.hidden_size)
    start_weights = load_file(str(Path(resume) / "model.safetensors")) if resume else None
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(start_weights[name] if start_weights else _init(name, tuple(p.shape), seed))
    params = [*model.parameters(), *probes.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    start, step, history, interrupted = time.time(), 0, [], False
    budget = minutes * 60
    try:
        while (max_steps is None or step < max_steps) and time.time() - start < budget:
            progress = min(1.0, (time.time() - start) / budget) if max_steps is None else step / max_steps
            for group in opt.param_groups:  # warm-up, then cosine decay over the budget
                group["lr"] = lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
            length = round(float(rng.uniform(4, 16)), 1)
            loss, metrics = clips_loss(model, probes, tok, ids, [make_clip(rng, length) for _ in range(batch)], rng)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append(metrics)
            step += 1
            if step % 50 == 0:
                recent = {k: np.mean([m[k] for m in history[-50:]]) for k in history[-1]}
                log(f"step {step}  answer loss {recent['answer_loss']:.4f}  time probe {recent['time_probe']:.3f}  "
                    f"{time.time() - start:.0f} s")
    except KeyboardInterrupt:  # keep what was learnt so far
        interrupted = True
        log(f"interrupted at step {step}: writing the checkpoint")
    recent = history[-50:] or [{"answer_loss": float("nan"), "time_probe": float("nan")}]
    info = {"steps": step, "seconds": round(time.time() - start, 1), "interrupted": interrupted, "batch": batch, "lr": lr,
            "seed": seed, "resumed_from": str(resume) if resume else None,
            "final_answer_loss": float(np.mean([m["answer_loss"] for m in recent])),
            "final_time_probe_accuracy": float(np.mean([m["time_probe"] for m in recent]))}
    return write_trained_checkpoint(out_dir, model, raw, info)


def write_trained_checkpoint(out_dir: str | Path, model: MossAudio, raw_tokenizer, info: dict) -> Path:
    """The trained model as a Hugging Face layout checkpoint (fp32), with training.json."""
    params = dict(model.named_parameters())
    config = model.cfg.to_hf_dict()
    config["dtype"] = "float32"
    return write_checkpoint(Path(out_dir), config, [list(params)], lambda name: params[name].detach().contiguous(),
                            token_ids(raw_tokenizer), lambda folder: raw_tokenizer.save(str(folder / "tokenizer.json")),
                            {"training.json": info})
