"""What each `moss-edge` command does; cli.py parses the arguments and calls these."""

import json
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
    out = export_artifact(args.checkpoint, args.output, opset=args.opset, verify_steps=0 if args.no_verify else args.steps,
                          token_ids=_token_ids(args), log=lambda m: print(m, file=sys.stderr), verify_audio=args.audio)
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
    from moss_edge.runtime.parity import top1_text

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

    if (args.realtime or args.exact) and not args.stream_input:
        raise MossEdgeError("--realtime and --exact are options of --stream-input")
    pipe = Pipeline.load(args.artifact, provider=args.provider, threads=args.threads, prefill=args.prefill)
    opts = _sampling(args)
    if args.stream_input:
        result = _live_source(pipe, args, opts)
    elif args.stream and not args.json and pipe.tokenizer is not None:
        for piece in pipe.stream(args.audio, _prompt(args), opts):
            print(piece, end="", flush=True)
        print()
        return
    else:
        result = pipe.generate(args.audio, _prompt(args), opts)
    if args.json:
        print(json.dumps({"text": result.text, "thinking": result.thinking, "tokens": result.tokens,
                          "prompt_tokens": result.prompt_tokens, "stop_reason": result.stop_reason,
                          "timings": result.timings, "settings": pipe.settings}, indent=2))
        return
    if pipe.tokenizer is None:  # no text without a tokenizer: the generated ids are the answer
        print(" ".join(str(t) for t in result.tokens))
        return
    if args.show_thinking and result.thinking:
        print(f"<think>{result.thinking}</think>")
    print(result.text)


def _live_source(pipe, args, opts):
    """--stream-input: the file fed as a live source would feed it (blocks of 0.1 s, in real
    time with --realtime), answered by a streamed request; says how long the answer took to
    start once the audio ended."""
    import time

    from moss_edge.runtime.audio import read_audio

    if len(args.audio) != 1:
        raise MossEdgeError("--stream-input takes one --audio file (one live source)")
    samples, rate = read_audio(args.audio[0])
    block = max(1, rate // 10)
    with pipe.open_stream(_prompt(args), rate=rate, exact=args.exact) as live:
        start = time.perf_counter()
        for i in range(0, len(samples), block):
            if args.realtime:
                time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            live.feed(samples[i : i + block])
        result = live.finish(opts)
    t = result.timings
    print(f"end of audio -> first token: {t['end_of_audio_to_first_token_s']:.3f} s (encoder "
          f"{t['end_of_audio_encode_s']:.3f} s, decoder {t['end_of_audio_prefill_s']:.3f} s; {len(samples) / rate:.1f} s "
          f"of audio{', fed in real time' if args.realtime else ''}{', exact' if args.exact else ''})", file=sys.stderr)
    return result


def cmd_verify(args) -> None:
    from moss_edge.runtime.artifact import Artifact
    from moss_edge.runtime.parity import report_markdown

    manifest = Artifact.load(args.artifact, check_hashes=False, unfinished_ok=True).manifest
    if args.reference is None and not args.audio and "reference" in manifest:
        report = verify_recorded(args.artifact, args.provider, manifest)  # no PyTorch needed
    else:
        from moss_edge.export.verify import Verifier
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


def verify_recorded(artifact: str, provider: str, manifest: dict) -> dict:
    """The artifact on `provider` against the answers it carries. fp16 graphs on the CPU run as
    their emulated fp32 twins, which needs onnx (the export extra); GPUs run them as they are."""
    from moss_edge.runtime.artifact import fp16_graphs
    from moss_edge.runtime.parity import check_recorded

    if provider != "cpu" or not fp16_graphs(manifest):
        return check_recorded(artifact, provider)
    try:
        from moss_edge.export.verify import emulated_on_cpu, mark_emulated
    except ImportError:
        raise MossEdgeError(f"{artifact} computes in fp16, for GPUs: verify it with --provider cuda or tensorrt, or "
                            "install the export extra (onnx) to run its graphs emulated on this CPU") from None
    with emulated_on_cpu(artifact, provider) as view:
        report = check_recorded(view, provider)
    report["artifact"] = artifact
    mark_emulated(report, manifest, provider)
    return report


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
    from moss_edge.runtime.artifact import Artifact, fp16_graphs, promoted_lines, summarize_kept

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
    print(f"{'graph':<15} {'precision':<12} {'opset':<6} {'MiB':>9}  inputs -> outputs")
    counted = set()  # decoder_ort reads the decoder's weight file: its size is counted once
    for name, g in m["graphs"].items():
        mib = sum((artifact.root / f).stat().st_size for f in g["files"] if f not in counted) / 2**20
        counted.update(g["files"])
        ins = ", ".join(i["name"] for i in g["inputs"][:4]) + (", ..." if len(g["inputs"]) > 4 else "")
        outs = ", ".join(o["name"] for o in g["outputs"][:2]) + (", ..." if len(g["outputs"]) > 2 else "")
        print(f"{name:<15} {g['precision']:<12} {g['opset']:<6} {mib:>9.2f}  {ins} -> {outs}")
    if m.get("decoders"):
        print("decoders  " + ", ".join(f"{provider} runs {graph}" for provider, graph in m["decoders"].items())
              + "; other providers run decoder")
    if m.get("prefill"):
        print("prompts   " + ", ".join(f"{provider} runs {graph} (INT8, per-row activations) where the CPU has integer "
                                       "dot-product or matrix instructions" for provider, graph in m["prefill"].items()))
    kv = m.get("quantization", {}).get("kv_cache")
    if kv:
        cpu = ", ".join(g for g in m["graphs"] if m["graphs"][g].get("onnxruntime"))
        too_old = artifact.unsupported(m["decoders"]["cpu"])
        print(f"KV cache  {kv['dtype']} in {cpu} ({kv['scales']}; onnxruntime {kv['onnxruntime']}"
              + (f"; {too_old}: the runtime runs the portable decoder, fp32 cache" if too_old else "") + ")")
    half = fp16_graphs(m)
    if half:
        print(f"fp16      {', '.join(half)} compute in fp16 (GPUs; verified on a CPU through emulation)")
    headroom = m.get("quantization", {}).get("fp16_headroom", {}).get("encoder")
    if headroom:
        print(f"fp16      encoder's largest value {headroom['largest']:.1f} on the bundled recordings: "
              f"{headroom['headroom']:.0f}x headroom under 65504 (residual stream clamped at +-{headroom['clamp']:.0f})")
    if m.get("reference"):
        r = m["reference"]
        print(f"reference {r['file']} ({r['bytes'] / 2**20:.2f} MiB): the fp32 PyTorch model's answers from checkpoint "
              f"sha256 {r['source_sha256'][:16]}... on {', '.join(r['audio'])}, {r['prompt_tokens']} prompt tokens, "
              f"{r['steps']} steps (top {r['top_k']}); `moss-edge verify` checks against them without PyTorch")
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
    for line in promoted_lines(m.get("quantization", {}).get("promoted", {}), m.get("quantization", {}).get("keep_until_pass")):
        print(f"promoted  {line}")


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
    print(f"{'backend':<12} {'encoder s':>10} {'prefill ms':>11} {'decode ms/tok':>14} {'streamed wait s':>16}  parity"
          f"   ({where})")
    for backend, r in table.items():
        checks = result["parity"].get(backend, {}).values()
        parity = "n/a" if not checks else "FAILED" if any(p.get("passed") is False for p in checks) else "passed"
        wait = r.get("streamed_end_of_audio_to_first_token_s")
        print(f"{backend:<12} {r['encoder_s']:>10.2f} {r['prefill_ms']:>11.0f} {r['decode_ms_per_token']:>14.1f} "
              f"{'-' if wait is None else f'{wait:.2f}':>16}  {parity}")
    print(f"wrote {args.output} and {chart}")


def cmd_quantize(args) -> None:
    from moss_edge.quantize.artifact import quantize_artifact

    _quantize(args, lambda **options: quantize_artifact(args.artifact, args.output, **options))


def _quantize(args, make) -> None:
    """What quantize and export --recipe share: the recipe, the verifier, the report."""
    from moss_edge.quantize.keep import advice
    from moss_edge.quantize.recipe import load_recipe
    from moss_edge.runtime.artifact import promoted_lines, summarize_kept
    from moss_edge.export.writer import check_output

    recipe = load_recipe(args.recipe)
    check_output(Path(args.output))
    verify = False
    if not args.no_verify:
        from moss_edge.export.verify import Verifier
        from moss_edge.sound_events.evaluate import task_report

        verify = Verifier(args.reference, args.audio, args.steps, evaluate=task_report(args.task_examples))
    cache = Path(args.cache_dir) if args.cache_dir else Path.home() / ".cache" / "moss-edge"
    result = make(recipe=recipe, calibration=args.calibration, cache_dir=cache, verify=verify,
                  keep_until_pass=args.keep_until_pass, log=lambda m: print(m, file=sys.stderr))
    manifest = result.manifest
    for line in summarize_kept(manifest["quantization"]["higher_precision"]):
        print(f"kept: {line}")
    for line in promoted_lines(manifest["quantization"].get("promoted", {}), manifest["quantization"].get("keep_until_pass")):
        print(f"promoted: {line}")
    if "parity" in manifest:
        _print_summary(manifest["parity"])
    print(f"runs on: {', '.join(manifest['backends'])}")
    failed = result.report is not None and not result.report["summary"]["passed"]
    _finish(result.path, manifest.get("parity", {}), advice(result.report, recipe, args.keep_until_pass,
                                                            manifest["quantization"].get("promoted")) if failed else "")


def cmd_train_tiny(args) -> None:
    from moss_edge.export.writer import check_output
    from moss_edge.sound_events.train import train_tiny

    check_output(Path(args.output))
    out = train_tiny(args.output, minutes=args.minutes, max_steps=args.max_steps, batch=args.batch, seed=args.seed,
                     lr=args.lr, resume=args.resume, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote {out}: {json.loads((out / 'training.json').read_text())}")


def cmd_eval(args) -> None:
    from moss_edge.sound_events.evaluate import answerer, evaluate, model_and_tokenizer, streaming_answerer

    if not Path(args.path).exists():
        raise MossEdgeError(f"{args.path} not found: give a checkpoint folder or an artifact folder")
    model, tok = model_and_tokenizer(args.path)
    if args.stream_input:
        if not (Path(args.path) / "manifest.json").is_file() or args.no_deepstack or args.no_markers:
            raise MossEdgeError("--stream-input evaluates an artifact (ONNX Runtime), without the ablations")
        answer = streaming_answerer(model, tok, exact=args.exact)
    else:
        answer = answerer(model, tok, deepstack=not args.no_deepstack, time_markers=not args.no_markers)
    result = evaluate(answer, n=args.n, seed=args.seed)
    result.update(path=str(args.path), no_deepstack=args.no_deepstack, no_markers=args.no_markers,
                  stream_input=args.stream_input, exact=args.exact)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"exact match {result['exact_match']:.3f}  event list {result['event_list_exact_match']:.3f}  "
          f"start times {result['start_time_accuracy']:.3f}  (n={args.n}, seed={args.seed})")
    for task, acc in result["per_task"].items():
        print(f"  task {task:<6} {acc:.3f}")
    for label, acc in result["per_class"].items():
        print(f"  class {label:<14} {acc:.3f}")


def cmd_serve(args) -> None:
    from moss_edge.runtime.artifact import Artifact
    from moss_edge.serve import serve

    Artifact.load(args.artifact)  # a missing or damaged artifact says so before the server starts
    if args.check:  # the artifact's answers on this machine, before any client sees one
        from moss_edge.runtime.parity import check_recorded

        summary = check_recorded(args.artifact, "cpu")["summary"]
        if not summary["passed"]:
            raise MossEdgeError(f"{args.artifact} fails its parity check on this machine ({'; '.join(summary['failures'])}): "
                                "not serving it; `moss-edge verify` prints the report")
        print(f"parity check passed on this machine (worst cosine {summary['worst_cosine']:.6f})", file=sys.stderr)
    serve(Path(args.artifact), args.instances, args.threads, args.host, args.http_port, args.grpc_port,
          args.metrics_port, args.max_queue, args.queue_timeout, log=lambda m: print(m, file=sys.stderr, flush=True))


def cmd_eval_many(args) -> None:
    from moss_edge.evaluate_many import evaluate_many, read_items
    from moss_edge.runtime.artifact import Artifact

    for artifact in args.artifacts:
        Artifact.load(artifact)  # each one loads, before a cluster is started for it
    items = read_items(Path(args.items), args.prompt)
    result = evaluate_many([Path(a) for a in args.artifacts], items, Path(args.output), args.actors, args.address,
                           args.max_new_tokens, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2))


def cmd_triton_repo(args) -> None:
    from moss_edge.triton_repo import write_repository

    out = write_repository(Path(args.artifact), Path(args.output), gpu=args.gpu, instances=args.instances)
    print(f"wrote {out}")
