"""The `moss-edge` command line."""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from moss_edge import bundled_audio
from moss_edge.runtime.errors import MossEdgeError


def cmd_synthetic(args) -> None:
    from moss_edge.export.synthetic import preset, write_synthetic_checkpoint

    cfg = preset(args.preset, args.encoder_layers, args.decoder_layers)
    out = write_synthetic_checkpoint(args.output, cfg, dtype=args.dtype, seed=args.seed, shard_mb=args.shard_mb)
    print(f"wrote a random {args.preset} MOSS-Audio checkpoint to {out}")


def cmd_demo(args) -> None:
    from moss_edge.export.reference import ReferencePipeline
    from moss_edge.export.synthetic import preset, write_synthetic_checkpoint
    from moss_edge.runtime.audio import load_audio, log_mel
    from moss_edge.runtime.generation import stream_text
    from moss_edge.runtime.prompt import TextTokenizer, chat_prompt_ids
    from moss_edge.runtime.sampling import SamplingOptions

    work = Path(args.workdir or tempfile.mkdtemp(prefix="moss-edge-demo-"))
    checkpoint = work / "checkpoint"
    print("This demo uses a small RANDOM MOSS-Audio model: its words are meaningless; the numbers are real.")
    if not checkpoint.exists():
        write_synthetic_checkpoint(checkpoint, preset("tiny"), dtype="fp32")
    print(f"checkpoint: {checkpoint}")
    pipe = ReferencePipeline.load(checkpoint)
    tokenizer = TextTokenizer.from_dir(checkpoint)
    audio_path = args.audio or bundled_audio()
    start = time.perf_counter()
    features = pipe.encode([log_mel(load_audio(audio_path))])
    encode_s = time.perf_counter() - start
    question = "What is said in the first 4 seconds?"
    prompt = chat_prompt_ids(tokenizer, question, features.clip_tokens, pipe.ids)
    print(f"audio: {audio_path} ({features.clip_tokens[0]} audio tokens, encoded in {encode_s * 1000:.0f} ms)")
    print(f"question: {question}\nanswer (PyTorch reference): ", end="", flush=True)
    tokens = pipe.generate(prompt, features, SamplingOptions(max_new_tokens=args.max_new_tokens))
    for piece in stream_text(tokenizer.decode, tokens):
        print(piece, end="", flush=True)
    print()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moss-edge", description="Export, quantize and run MOSS-Audio on edge devices.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the built-in end-to-end demo, offline",
                       epilog="example: moss-edge demo --workdir /tmp/moss-demo")
    p.add_argument("--workdir", help="where to keep the demo's files (default: a new temp folder)")
    p.add_argument("--audio", help="a recording to use instead of the bundled English clip")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("synthetic", help="write a random MOSS-Audio checkpoint in Hugging Face layout",
                       epilog="example: moss-edge synthetic -o ckpt-4b-2l --preset 4b --encoder-layers 2 --decoder-layers 2")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--preset", choices=["tiny", "4b", "8b"], default="tiny")
    p.add_argument("--encoder-layers", type=int)
    p.add_argument("--decoder-layers", type=int)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-mb", type=int, default=2000, help="shard size in MiB")
    p.set_defaults(func=cmd_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MossEdgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileExistsError as err:
        print(f"error: {err}; choose another output path or remove it", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
