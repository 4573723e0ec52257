"""The `moss-edge` command line: its arguments; moss_edge/commands.py does the work."""

import argparse
import os
import sys

from moss_edge import __version__
from moss_edge.commands import (cmd_bench, cmd_check, cmd_demo, cmd_eval, cmd_eval_many, cmd_export, cmd_info, cmd_quantize, cmd_run,
                                cmd_serve, cmd_synthetic, cmd_train_tiny, cmd_triton_repo, cmd_verify)
from moss_edge.quantize.recipe import PRESETS
from moss_edge.runtime.errors import MossEdgeError
from moss_edge.serve import MAX_QUEUE, QUEUE_TIMEOUT_S


def _steps(text: str) -> int:
    try:
        steps = int(text)
    except ValueError:
        steps = 0
    if steps < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: decode steps are a whole number >= 1 (--no-verify skips the check)")
    return steps


def _parity_options(p, steps: int, skip: bool = True) -> None:
    """The parity check's options, with the same names and meanings in export, quantize and verify."""
    p.add_argument("--audio", action="append", help="held-out audio for the parity check (default: a bundled recording)")
    p.add_argument("--steps", type=_steps, default=steps, help=f"decode steps in the parity check (default {steps})")
    if skip:
        p.add_argument("--no-verify", action="store_true", help="skip the parity check")
    p.add_argument("--task-examples", type=int, default=100,
                   help="held-out sound-event examples for task accuracy, when the artifact comes from `moss-edge train-tiny`'s model (0: off)")


def _quantize_options(p) -> None:
    p.add_argument("--calibration", help="audio folder, glob or list file (default: the bundled recordings)")
    p.add_argument("--reference", help="checkpoint to verify against (default: the one the artifact came from)")
    p.add_argument("--keep-until-pass", action="store_true",
                   help="keep the most error-sensitive decoder weights more precise until the parity check passes")
    p.add_argument("--cache-dir", help="where calibration statistics are cached (default ~/.cache/moss-edge)")


def build_parser() -> argparse.ArgumentParser:
    from moss_edge.runtime.pipeline import PREFILL_PATHS
    from moss_edge.runtime.session import PROVIDERS

    parser = argparse.ArgumentParser(prog="moss-edge", description="Export, quantize and run MOSS-Audio on edge devices.")
    parser.add_argument("--version", action="version", version=f"moss-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the built-in end-to-end demo, offline",
                       epilog="example: moss-edge demo --workdir /tmp/moss-demo")
    p.add_argument("--workdir", help="where to keep the demo's files (default: a new temp folder)")
    p.add_argument("--audio", help="a recording to use instead of the bundled English clip")
    p.add_argument("--max-new-tokens", type=int, default=40)
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

    p = sub.add_parser("export", help="split a checkpoint into ONNX graphs (an fp32 artifact)",
                       epilog="example: moss-edge export MOSS-Audio-4B-Instruct -o moss-4b-fp32")
    p.add_argument("checkpoint", help="a MOSS-Audio checkpoint folder (Hugging Face layout)")
    p.add_argument("-o", "--output", required=True, help="the artifact folder to create")
    p.add_argument("--opset", type=int, default=21,
                   help="21 (default) runs everywhere incl. TensorRT 10.3; 23 fuses attention and RMSNorm (ORT CPU only)")
    p.add_argument("--audio-token-id", type=int, help="id of <|AUDIO|> (default: processor_config.json, else upstream's)")
    p.add_argument("--audio-start-id", type=int, help="id of <|audio_bos|> (default: processor_config.json, else upstream's)")
    p.add_argument("--audio-end-id", type=int, help="id of <|audio_eos|> (default: processor_config.json, else upstream's)")
    p.add_argument("--digit-ids", help="ids of the digits 0-9 used by time markers, comma-separated (default: 15-24)")
    p.add_argument("--recipe", help=f"straight to a quantized artifact ({', '.join(PRESETS)} or a JSON recipe "
                                    "file): each weight read from the checkpoint, quantized and written, no fp32 artifact")
    _quantize_options(p)
    _parity_options(p, steps=16)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="make an INT8 / INT4 artifact from an fp32 one",
                       epilog="examples:\n  moss-edge quantize moss-4b-fp32 -o moss-4b-int4 --recipe int4-awq\n"
                              "  moss-edge quantize moss-4b-fp32 -o moss-4b-custom --recipe my-recipe.json --calibration clips/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="an fp32 artifact made by `moss-edge export`")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--recipe", default="int4-awq", help=f"{', '.join(PRESETS)}, or a JSON recipe file")
    _quantize_options(p)
    _parity_options(p, steps=32)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("run", help="answer a question about audio with an artifact",
                       epilog='example: moss-edge run moss-4b-int4 --audio talk.wav --prompt "Summarise this." --stream')
    p.add_argument("artifact")
    p.add_argument("--audio", action="append", required=True, help="an audio file; repeat for several clips")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="the question (goes through the chat template)")
    group.add_argument("--prompt-ids", help="explicit token ids; mark each clip with audio_bos, audio_eos")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--show-thinking", action="store_true", help="print a Thinking model's reasoning too")
    p.add_argument("--provider", choices=list(PROVIDERS), default="cpu")
    p.add_argument("--threads", type=int, help="intra-op threads (default: the cores available)")
    p.add_argument("--prefill", choices=PREFILL_PATHS, default="auto",
                   help="how the prompt runs: int8, the artifact's prompt graph on the CPU's integer GEMM; decoder, "
                        "the token graph; auto (default): int8 where the artifact has it and the CPU has integer "
                        "dot-product or matrix instructions")
    p.add_argument("--json", action="store_true", help="print text, tokens and timings as JSON")
    p.add_argument("--stream-input", action="store_true",
                   help="feed the file as a live source (0.1 s blocks), encoding and prefilling while it arrives; "
                        "prints the time from the end of the audio to the first token")
    p.add_argument("--realtime", action="store_true", help="with --stream-input: feed at the audio's own pace")
    p.add_argument("--exact", action="store_true",
                   help="with --stream-input: the offline path's result (re-encodes chunks the final mel floor changes)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("verify", help="compare an artifact with the PyTorch model: its recorded answers, or the checkpoint",
                       epilog="examples: moss-edge verify moss-4b-trt --provider tensorrt (the recorded answers, no "
                              "PyTorch); moss-edge verify moss-4b-int4 --reference MOSS-Audio-4B-Instruct --json parity.json")
    p.add_argument("artifact")
    p.add_argument("--reference", help="the checkpoint the artifact came from, run with PyTorch (default: the answers "
                                       "the artifact recorded from it; without them, the checkpoint its manifest names)")
    _parity_options(p, steps=32, skip=False)  # --audio and --steps with --reference: the recorded answers have theirs
    p.add_argument("--provider", choices=list(PROVIDERS), default="cpu")
    p.add_argument("--json", help="write the full report as JSON here")
    p.add_argument("--markdown", help="write the report as Markdown here")
    p.add_argument("--plot", help="write a PNG of per-step KL and per-graph cosine here")
    p.add_argument("--print-json", action="store_true", help="print the summary as JSON instead of Markdown")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", help="time the PyTorch reference and artifacts at real widths",
                       epilog="example: moss-edge bench --preset 4b --depths 4,8 -o bench.json")
    p.add_argument("--preset", choices=["tiny", "4b", "8b"], default="4b")
    p.add_argument("--depths", default="4,8", help="layer counts to measure; two give a per-layer extrapolation "
                   "(from 3 encoder layers on, a shallow model has all three DeepStack mergers)")
    p.add_argument("--workdir", default="bench-work", help="checkpoints and artifacts are kept here between runs")
    p.add_argument("--audio-seconds", type=float, default=30.0)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recipes", default="int8,int4,int4-awq", help="quantization recipes to time too (comma list)")
    p.add_argument("--opset", type=int, default=21, help="opset of the exported graphs (23: fused attention, CPU only)")
    p.add_argument("-o", "--output", default="bench.json")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train-tiny", help="train the small sound-event MOSS-Audio on CPU",
                       epilog="example: moss-edge train-tiny -o tiny-moss --minutes 25")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--minutes", type=float, default=28.0, help="training time budget (default 28)")
    p.add_argument("--max-steps", type=int, help="stop after this many training steps (default: the time budget)")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", help="continue from a checkpoint an earlier run wrote")
    p.set_defaults(func=cmd_train_tiny)

    p = sub.add_parser("eval", help="task accuracy of the sound-event model (checkpoint or artifact)",
                       epilog="example: moss-edge eval tiny-moss-int4 --n 300 --json")
    p.add_argument("path", help="a checkpoint folder (PyTorch reference) or an artifact folder (ONNX Runtime)")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=1234, help="held-out seed (training uses 0)")
    p.add_argument("--no-deepstack", action="store_true", help="ablation: zero the DeepStack injection")
    p.add_argument("--no-markers", action="store_true", help="ablation: no time markers in the prompt")
    p.add_argument("--stream-input", action="store_true", help="feed each clip as a live source (0.25 s blocks)")
    p.add_argument("--exact", action="store_true", help="with --stream-input: the offline path's mel floor")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("check", help="what TensorRT / ONNX Runtime targets would reject, node by node, without them",
                       epilog="example: moss-edge check moss-4b-int4 --target tensorrt-10.3   (exit 1 when a target fails)")
    p.add_argument("artifact")
    p.add_argument("--target", action="append", help="tensorrt-10.3 (JetPack 6), tensorrt-10.16, ort-cuda or ort-cpu; "
                   "repeat for several (default: all)")
    p.add_argument("--json", action="store_true", help="every finding, with its rule and source")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("eval-many", help="answer many clips with several artifacts on Ray (the scale extra)",
                       epilog="example: moss-edge eval-many moss-int4 moss-int8 --items clips.jsonl -o results --actors 2")
    p.add_argument("artifacts", nargs="+", help="artifact folders; the first is the reference for agreement")
    p.add_argument("--items", required=True, help="a folder of clips (with --prompt) or a JSONL list of "
                   '{"audio": path, "prompt": text, "expected": text}')
    p.add_argument("--prompt", help="the question for clips without one")
    p.add_argument("-o", "--output", required=True, help="folder for results.jsonl and summary.json")
    p.add_argument("--actors", type=int, default=2, help="pipelines per artifact, each with the cores / actors")
    p.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_eval_many)

    p = sub.add_parser("triton-repo", help="write an artifact as a Triton model repository (ONNX Runtime backend "
                       "graphs + a Python-backend model that answers)",
                       epilog="example: moss-edge triton-repo moss-4b-trt -o models --gpu")
    p.add_argument("artifact")
    p.add_argument("-o", "--output", required=True, help="the repository folder to create")
    p.add_argument("--gpu", action="store_true", help="graph models on the GPU (TensorRT where the artifact's checks "
                   "passed it); default: CPU")
    p.add_argument("--instances", type=int, default=1, help="instances of each model")
    p.set_defaults(func=cmd_triton_repo)

    p = sub.add_parser("serve", help="serve an artifact with Triton Inference Server (the serve extra)",
                       epilog="example: moss-edge serve moss-4b-int4 --instances 2 --http-port 8000")
    p.add_argument("artifact")
    p.add_argument("--instances", type=int, default=1, help="pipelines per model, each answering one request at a time")
    p.add_argument("--threads", type=int, help="intra-op threads per instance (default: the cores / instances)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                   help="requests each model holds waiting beyond those running; more are refused at once (HTTP 503)")
    p.add_argument("--queue-timeout", type=float, default=QUEUE_TIMEOUT_S, metavar="SECONDS",
                   help="longest a request waits for an instance; it is then refused (HTTP 503)")
    p.add_argument("--check", action="store_true",
                   help="check the artifact against its recorded reference answers first; refuse to serve it if it fails")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("info", help="show an artifact's manifest as a table", epilog="example: moss-edge info moss-4b-int4")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.add_argument("--no-hash-check", action="store_true", help="skip the sha256 check of the graph files")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MossEdgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PermissionError as err:
        print(f"error: no permission to {'write' if err.filename else 'use'} {err.filename or err}; "
              "choose a folder you can write to", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # staged outputs have already been removed on the way out
        print("interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
