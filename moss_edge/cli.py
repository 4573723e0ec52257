"""The `moss-edge` command line."""

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from moss_edge.runtime.errors import MossEdgeError


def cmd_synthetic(args) -> None:
    from moss_edge.export.synthetic import preset, write_synthetic_checkpoint

    cfg = preset(args.preset, args.encoder_layers, args.decoder_layers)
    out = write_synthetic_checkpoint(args.output, cfg, dtype=args.dtype, seed=args.seed, shard_mb=args.shard_mb)
    print(f"wrote a random {args.preset} MOSS-Audio checkpoint to {out}")


def cmd_demo(args) -> None:
    from moss_edge.demo import run_demo

    run_demo(args.workdir, args.audio, args.max_new_tokens)


def _token_ids(args):
    """The token ids given on the command line over what the checkpoint's files say."""
    from moss_edge.export.checkpoint import read_token_ids

    ids = read_token_ids(args.checkpoint)
    for flag in ("audio_token", "audio_start", "audio_end"):
        value = getattr(args, f"{flag}_id")
        if value is not None:
            setattr(ids, flag, value)
    if args.digit_ids is not None:
        try:
            ids.digits = [int(t) for t in args.digit_ids.replace(",", " ").split()]
        except ValueError:
            raise MossEdgeError("--digit-ids takes the ten ids of the digits 0-9, separated by commas") from None
        if len(ids.digits) != 10:
            raise MossEdgeError(f"--digit-ids takes ten ids (the digits 0-9); got {len(ids.digits)}")
    return ids


def cmd_export(args) -> None:
    from moss_edge.export.onnx_export import export_artifact

    if args.recipe:
        from moss_edge.quantize.artifact import export_quantized

        _quantize(args, lambda **options: export_quantized(args.checkpoint, args.output, opset=args.opset,
                                                           token_ids=_token_ids(args), **options))
        return
    out = export_artifact(args.checkpoint, args.output, opset=args.opset, verify_steps=args.verify_steps,
                          token_ids=_token_ids(args), log=lambda m: print(m, file=sys.stderr))
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    _print_summary(parity)
    _finish(out, parity, "the fp32 graphs do not reproduce the PyTorch model: report the failures above, or check "
                         "the checkpoint for NaN/Inf weights")


def _finish(out: Path, parity: dict, advice: str) -> None:
    """Say where the artifact is; a failed parity check exits 1 with what to try."""
    if parity.get("passed", True):
        print(f"wrote {out}")
        return
    print(f"wrote {out}, but it FAILED its parity check (its manifest says so; `moss-edge info` and "
          f"Pipeline.load warn about it): {advice}", file=sys.stderr)
    raise SystemExit(1)


def _print_summary(summary: dict) -> None:
    from moss_edge.export.verify import top1_text

    if "skipped" in summary:
        print(f"parity not checked: {summary['skipped']}")
        return
    state = "passed" if summary["passed"] else "FAILED"
    print(f"parity {state} ({summary['precision']}): worst cosine {summary['worst_cosine']:.6f}, "
          f"prefill logits rel. error {summary['prefill_logits_rel']:.2e}, mean KL {summary['kl_mean']:.2e}, "
          f"top-1 {top1_text(summary['top1_agreement'], summary.get('top1_decided', 0), summary['steps'])}, "
          f"greedy match {summary['greedy_match']:.3f}")
    if "task_exact_match" in summary:
        print(f"task accuracy (exact match): {summary['task_exact_match']:.3f} "
              f"(fp32 reference {summary['task_reference_exact_match']:.3f}), event list {summary['event_list_exact_match']:.3f}")
    for failure in summary["failures"]:
        print(f"  - {failure}")


def _sampling(args):
    from moss_edge.runtime.sampling import SamplingOptions

    return SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed)


def _prompt(args):
    if args.prompt_ids is not None:
        try:
            return [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise MossEdgeError("--prompt-ids takes integers separated by commas or spaces") from None
    return args.prompt


def cmd_run(args) -> None:
    from moss_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(args.artifact, provider=args.provider, threads=args.threads)
    opts = _sampling(args)
    if args.stream and not args.json and pipe.tokenizer is not None:
        for piece in pipe.stream(args.audio, _prompt(args), opts):
            print(piece, end="", flush=True)
        print()
        return
    result = pipe.generate(args.audio, _prompt(args), opts)
    if args.json:
        print(json.dumps({"text": result.text, "thinking": result.thinking, "tokens": result.tokens,
                          "prompt_tokens": result.prompt_tokens, "stop_reason": result.stop_reason,
                          "timings": result.timings}, indent=2))
        return
    if pipe.tokenizer is None:  # no text without a tokenizer: the generated ids are the answer
        print(" ".join(str(t) for t in result.tokens))
        return
    if args.show_thinking and result.thinking:
        print(f"<think>{result.thinking}</think>")
    print(result.text)


def cmd_verify(args) -> None:
    from moss_edge.export.verify import Verifier, report_markdown
    from moss_edge.sound_events.evaluate import task_report

    report = Verifier(args.reference, args.audio, args.steps, args.provider, task_report(args.task_examples))(args.artifact)
    markdown = report_markdown(report)
    for path, text in ((args.json, json.dumps(report, indent=2)), (args.markdown, markdown)):
        if path:
            Path(path).write_text(text)
    if args.plot:
        from moss_edge.plots import parity_chart

        parity_chart(report, Path(args.plot))
    print(json.dumps(report["summary"], indent=2) if args.print_json else markdown)
    if not report["summary"]["passed"]:
        raise SystemExit(1)


def cmd_check(args) -> None:
    from moss_edge.runtime.artifact import Artifact
    from moss_edge.export.backend_check import check_artifact, summary_lines
    from moss_edge.export.engine_plan import artifact_plan, plan_lines

    artifact = Artifact.load(args.artifact, check_hashes=False)
    checks = check_artifact(artifact.root, artifact.manifest, args.target)
    plan = artifact_plan(artifact.root, artifact.manifest) if any(t.startswith("tensorrt") for t in checks) else None
    if args.json:
        print(json.dumps({"checks": checks, "engine_plan": asdict(plan) if plan else None}, indent=2))
    else:
        print("\n".join(summary_lines(checks) + (plan_lines(plan) if plan else [])))
    if not all(r["passed"] for r in checks.values()):
        raise SystemExit(1)


def cmd_info(args) -> None:
    from moss_edge.quantize.plan import summarize_kept
    from moss_edge.runtime.artifact import Artifact

    artifact = Artifact.load(args.artifact, check_hashes=not args.no_hash_check)
    m = artifact.manifest
    if args.json:
        print(json.dumps(m, indent=2))
        return
    if artifact.failed_parity:
        print(f"FAILED    this artifact failed its parity check: {'; '.join(m['parity']['failures'])}")
    print(f"artifact  {artifact.root}  (format {m['format_version']}, {m['created_by']})")
    print(f"source    {m['source']['checkpoint']}  sha256 {m['source']['sha256'][:16]}...")
    sizes = m["model"]
    print(f"model     decoder {sizes['num_hidden_layers']} layers x {sizes['hidden_size']}, vocab {sizes['vocab_size']}, "
          f"DeepStack {sizes['num_deepstack']}, chunk {sizes['chunk_frames']} frames")
    print(f"{'graph':<11} {'precision':<12} {'opset':<6} {'MiB':>9}  inputs -> outputs")
    counted = set()  # decoder_ort reads the decoder's weight file: its size is counted once
    for name, g in m["graphs"].items():
        mib = sum((artifact.root / f).stat().st_size for f in g["files"] if f not in counted) / 2**20
        counted.update(g["files"])
        ins = ", ".join(i["name"] for i in g["inputs"][:4]) + (", ..." if len(g["inputs"]) > 4 else "")
        outs = ", ".join(o["name"] for o in g["outputs"][:2]) + (", ..." if len(g["outputs"]) > 2 else "")
        print(f"{name:<11} {g['precision']:<12} {g['opset']:<6} {mib:>9.2f}  {ins} -> {outs}")
    if m.get("decoders"):
        print("decoders  " + ", ".join(f"{provider} runs {graph}" for provider, graph in m["decoders"].items())
              + "; other providers run decoder")
    print(f"runs on   {', '.join(m['backends']) or 'nothing checked'}")
    for target, r in m.get("checks", {}).items():
        found = ", ".join(f"{n} {rule}" for rule, n in r["rules"].items()) or "nothing found"
        print(f"check     {target:<15} {'pass' if r['passed'] else 'FAIL'}  {found}")
    if "engine_plan" in m:
        from moss_edge.export.engine_plan import EnginePlan, plan_lines

        for line in plan_lines(EnginePlan(**m["engine_plan"])):
            print(f"jetson    {line.strip()}")
    if "parity" in m:
        _print_summary(m["parity"])
    for line in summarize_kept(m.get("quantization", {}).get("higher_precision", {})):
        print(f"kept      {line}")


def cmd_bench(args) -> None:
    from moss_edge.bench import BenchSettings, run_bench

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = BenchSettings(audio_seconds=args.audio_seconds, decode_tokens=args.decode_tokens, threads=args.threads)
    depths = [int(d) for d in args.depths.split(",")]
    recipes = [r for r in args.recipes.split(",") if r]
    result = run_bench(args.preset, depths, workdir, settings, recipes, args.opset, log=lambda m: print(m, file=sys.stderr))
    Path(args.output).write_text(json.dumps(result, indent=2))
    from moss_edge.plots import bench_chart

    chart = bench_chart(result, Path(args.output).with_suffix(".png"))
    table = result.get("extrapolated") or {b: r[depths[0]] for b, r in result["runs"].items()}
    where = "extrapolated to full depth" if "extrapolated" in result else f"at {depths[0]} layers"
    print(f"{'backend':<12} {'encoder s':>10} {'prefill ms':>11} {'decode ms/tok':>14}  parity   ({where})")
    for backend, r in table.items():
        checks = result["parity"].get(backend, {}).values()
        parity = "n/a" if not checks else "FAILED" if any(p.get("passed") is False for p in checks) else "passed"
        print(f"{backend:<12} {r['encoder_s']:>10.2f} {r['prefill_ms']:>11.0f} {r['decode_ms_per_token']:>14.1f}  {parity}")
    print(f"wrote {args.output} and {chart}")


def cmd_quantize(args) -> None:
    from moss_edge.quantize.artifact import quantize_artifact

    _quantize(args, lambda **options: quantize_artifact(args.artifact, args.output, **options))


def _quantize(args, make) -> None:
    """What quantize and export --recipe share: the recipe, the verifier, the report."""
    from moss_edge.quantize.plan import summarize_kept
    from moss_edge.quantize.recipe import load_recipe
    from moss_edge.export.writer import check_output

    recipe = load_recipe(args.recipe)
    check_output(Path(args.output))
    verify = False
    if not args.no_verify:
        from moss_edge.export.verify import Verifier
        from moss_edge.sound_events.evaluate import task_report

        verify = Verifier(args.reference, args.verify_audio, args.steps, evaluate=task_report(args.task_examples))
    cache = Path(args.cache_dir) if args.cache_dir else Path.home() / ".cache" / "moss-edge"
    result = make(recipe=recipe, calibration=args.calibration, cache_dir=cache, verify=verify,
                  keep_until_pass=args.keep_until_pass, log=lambda m: print(m, file=sys.stderr))
    manifest = result.manifest
    for line in summarize_kept(manifest["quantization"]["higher_precision"]):
        print(f"kept: {line}")
    if "parity" in manifest:
        _print_summary(manifest["parity"])
    print(f"runs on: {', '.join(manifest['backends'])}")
    advice = ("try --keep-until-pass (keeps the most error-sensitive decoder weights one step more precise), or a "
              "recipe that keeps more precision (--recipe int8, or a recipe file with \"keep\": [...])")
    _finish(result.path, manifest.get("parity", {}), advice)


def cmd_train_tiny(args) -> None:
    from moss_edge.export.writer import check_output
    from moss_edge.sound_events.train import train_tiny

    check_output(Path(args.output))
    out = train_tiny(args.output, minutes=args.minutes, max_steps=args.steps, batch=args.batch, seed=args.seed,
                     lr=args.lr, resume=args.resume, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote {out}: {json.loads((out / 'training.json').read_text())}")


def cmd_eval(args) -> None:
    from moss_edge.sound_events.evaluate import answerer, evaluate, model_and_tokenizer

    if not Path(args.path).exists():
        raise MossEdgeError(f"{args.path} not found: give a checkpoint folder or an artifact folder")
    model, tok = model_and_tokenizer(args.path)
    result = evaluate(answerer(model, tok, deepstack=not args.no_deepstack, time_markers=not args.no_markers),
                      n=args.n, seed=args.seed)
    result.update(path=str(args.path), no_deepstack=args.no_deepstack, no_markers=args.no_markers)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"exact match {result['exact_match']:.3f}  event list {result['event_list_exact_match']:.3f}  "
          f"start times {result['start_time_accuracy']:.3f}  (n={args.n}, seed={args.seed})")
    for task, acc in result["per_task"].items():
        print(f"  task {task:<6} {acc:.3f}")
    for label, acc in result["per_class"].items():
        print(f"  class {label:<14} {acc:.3f}")


def _quantize_options(p) -> None:
    p.add_argument("--calibration", help="audio folder, glob or list file (default: the bundled recordings)")
    p.add_argument("--reference", help="checkpoint to verify against (default: the one the artifact came from)")
    p.add_argument("--verify-audio", action="append", help="held-out audio for the parity check")
    p.add_argument("--steps", type=int, default=32, help="decode steps in the parity check")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check")
    p.add_argument("--task-examples", type=int, default=100,
                   help="held-out sound-event examples for task accuracy, when the artifact comes from `moss-edge train-tiny`'s model (0: off)")
    p.add_argument("--keep-until-pass", action="store_true",
                   help="keep the most error-sensitive decoder weights more precise until the parity check passes")
    p.add_argument("--cache-dir", help="where calibration statistics are cached (default ~/.cache/moss-edge)")


def build_parser() -> argparse.ArgumentParser:
    from moss_edge.runtime.session import PROVIDERS

    parser = argparse.ArgumentParser(prog="moss-edge", description="Export, quantize and run MOSS-Audio on edge devices.")
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
    p.add_argument("--verify-steps", type=int, default=16, help="decode steps in the parity check")
    p.add_argument("--audio-token-id", type=int, help="id of <|AUDIO|> (default: processor_config.json, else upstream's)")
    p.add_argument("--audio-start-id", type=int, help="id of <|audio_bos|> (default: processor_config.json, else upstream's)")
    p.add_argument("--audio-end-id", type=int, help="id of <|audio_eos|> (default: processor_config.json, else upstream's)")
    p.add_argument("--digit-ids", help="ids of the digits 0-9 used by time markers, comma-separated (default: 15-24)")
    p.add_argument("--recipe", help="straight to a quantized artifact (int8, int4, int4-awq, int4-trt or a JSON recipe "
                                    "file): each weight read from the checkpoint, quantized and written, no fp32 artifact")
    _quantize_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="make an INT8 / INT4 artifact from an fp32 one",
                       epilog="examples:\n  moss-edge quantize moss-4b-fp32 -o moss-4b-int4 --recipe int4-awq\n"
                              "  moss-edge quantize moss-4b-fp32 -o moss-4b-custom --recipe my-recipe.json --calibration clips/",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="an fp32 artifact made by `moss-edge export`")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--recipe", default="int4-awq", help="int8, int4, int4-awq, int4-trt, or a JSON recipe file")
    _quantize_options(p)
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
    p.add_argument("--json", action="store_true", help="print text, tokens and timings as JSON")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("verify", help="compare an artifact with the PyTorch reference",
                       epilog="example: moss-edge verify moss-4b-int4 --reference MOSS-Audio-4B-Instruct --json parity.json")
    p.add_argument("artifact")
    p.add_argument("--reference", help="the checkpoint the artifact came from (default: the path its manifest records)")
    p.add_argument("--audio", action="append", help="audio file(s) to check on (default: a bundled recording)")
    p.add_argument("--steps", type=int, default=32, help="decode steps compared")
    p.add_argument("--provider", choices=list(PROVIDERS), default="cpu")
    p.add_argument("--task-examples", type=int, default=100,
                   help="held-out sound-event examples for task accuracy, when the artifact comes from `moss-edge train-tiny`'s model (0: off)")
    p.add_argument("--json", help="write the full report as JSON here")
    p.add_argument("--markdown", help="write the report as Markdown here")
    p.add_argument("--plot", help="write a PNG of per-step KL and per-graph cosine here")
    p.add_argument("--print-json", action="store_true", help="print the summary as JSON instead of Markdown")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", help="time the PyTorch reference and artifacts at real widths",
                       epilog="example: moss-edge bench --preset 4b --depths 2,4 -o bench.json")
    p.add_argument("--preset", choices=["tiny", "4b", "8b"], default="4b")
    p.add_argument("--depths", default="2,4", help="layer counts to measure; two give a per-layer extrapolation")
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
    p.add_argument("--steps", type=int, help="stop after this many steps (default: the time budget)")
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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("check", help="what TensorRT / ONNX Runtime targets would reject, node by node, without them",
                       epilog="example: moss-edge check moss-4b-int4 --target tensorrt-10.3   (exit 1 when a target fails)")
    p.add_argument("artifact")
    p.add_argument("--target", action="append", help="tensorrt-10.3 (JetPack 6), tensorrt-10.16, ort-cuda or ort-cpu; "
                   "repeat for several (default: all)")
    p.add_argument("--json", action="store_true", help="every finding, with its rule and source")
    p.set_defaults(func=cmd_check)

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
