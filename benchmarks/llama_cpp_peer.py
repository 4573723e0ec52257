"""llama.cpp on the same decoder weights, in the same run as ours: the bar to beat.

The decoder of a MOSS-Audio checkpoint (Hugging Face layout; a synthetic one at real widths) is
written as a Qwen3 GGUF with the `gguf` package, quantized to Q4_0 by llama.cpp itself (its
default for Q4_0: the output matrix in Q6_K), and timed through llama-cpp-python beside our
INT4 artifacts of the same checkpoints: prefill of a 419-token prompt and 32 decode steps after
it, 2 threads, rounds alternating between the systems, the fastest of each kept. A least-squares
line through the depths gives per-layer and fixed costs, extrapolated to full depth.

llama.cpp has no DeepStack or audio-embedding inputs: it prefills 419 text ids, the same matmuls
and attention; ours prefills the same ids with zero audio rows. Optional, not CI:

    pip install llama-cpp-python gguf   # builds llama.cpp from source for this CPU
    python benchmarks/llama_cpp_peer.py CKPT-2l:ART-2l CKPT-4l:ART-4l -o benchmarks/peers-4b.json
"""

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
from safetensors import safe_open

from moss_edge.export.checkpoint import tensor_files
from moss_edge.export.config import load_config
from moss_edge.bench import decoder_times, fastest_alternating, fit_depths
from moss_edge.plots import full_depth_chart
from moss_edge.runtime.artifact import Artifact
from moss_edge.runtime.decoders import decoder_runner
from moss_edge.runtime.session import make_session

PROMPT, STEPS = 419, 32
LAYER_TENSORS = {  # ours (language_model.layers.N.) -> llama.cpp's (blk.N.)
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def write_gguf(checkpoint: Path, out: Path) -> None:
    """The checkpoint's decoder as an F16 Qwen3 GGUF (a vocabulary of placeholder tokens: the
    benchmark feeds token ids)."""
    import gguf

    lang = load_config(checkpoint).language
    files = tensor_files(checkpoint)
    w = gguf.GGUFWriter(str(out), "qwen3")
    w.add_context_length(4096)
    w.add_embedding_length(lang.hidden_size)
    w.add_block_count(lang.num_hidden_layers)
    w.add_feed_forward_length(lang.intermediate_size)
    w.add_head_count(lang.num_attention_heads)
    w.add_head_count_kv(lang.num_key_value_heads)
    w.add_key_length(lang.head_dim)
    w.add_value_length(lang.head_dim)
    w.add_rope_freq_base(lang.rope_theta)
    w.add_layer_norm_rms_eps(lang.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(lang.vocab_size)])
    w.add_token_scores([0.0] * lang.vocab_size)
    w.add_token_types([gguf.TokenType.NORMAL] * lang.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = {"language_model.embed_tokens.weight": "token_embd.weight", "language_model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(lang.num_hidden_layers):
        names.update({f"language_model.layers.{i}.{ours}": f"blk.{i}.{theirs}" for ours, theirs in LAYER_TENSORS.items()})
    for ours, theirs in names.items():
        with safe_open(str(files[ours]), framework="pt") as f:
            t = f.get_tensor(ours).float().numpy()
        w.add_tensor(theirs, t.astype(np.float32 if t.ndim == 1 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_q4_0(f16: Path, out: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {f16}")


class LlamaCpp:
    def __init__(self, gguf_path: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(str(gguf_path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def measure(self, ids: list[int]) -> tuple[float, float]:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(STEPS):
            self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        return prefill, (time.perf_counter() - start) * 1000 / STEPS


class Ours:
    def __init__(self, artifact: Path, threads: int):
        art = Artifact.load(artifact, check_hashes=False)
        name = art.decoder_for("cpu")
        self.dims, self.run = art.dims, decoder_runner(name, make_session(art.graph_path(name), "cpu", threads), art.dims)

    def measure(self, ids: list[int]) -> tuple[float, float]:
        return decoder_times(self.run, self.dims, ids, STEPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", help="CHECKPOINT:ARTIFACT of the same model at two or more decoder depths")
    parser.add_argument("--full-depth", type=int, default=36)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default="peers-work")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(exist_ok=True)
    systems, depths = {}, []
    for pair in args.pairs:
        checkpoint, artifact = (Path(p) for p in pair.split(":"))
        depth = load_config(checkpoint).language.num_hidden_layers
        depths.append(depth)
        q4 = work / f"{checkpoint.name}-q4_0.gguf"
        if not q4.exists():
            f16 = work / f"{checkpoint.name}-f16.gguf"
            write_gguf(checkpoint, f16)
            quantize_q4_0(f16, q4)
            f16.unlink()
        systems[("llama.cpp Q4_0", depth)] = LlamaCpp(q4, args.threads)
        systems[("ours INT4", depth)] = Ours(artifact, args.threads)
    ids = [int(i) for i in np.random.default_rng(0).integers(100, 1000, PROMPT)]
    best = fastest_alternating({key: partial(system.measure, ids) for key, system in systems.items()}, args.rounds)
    result = {"threads": args.threads, "prompt_tokens": PROMPT, "decode_tokens": STEPS, "rounds": args.rounds,
              "depths": depths, "systems": {name: fit_depths({d: best[(name, d)] for d in depths}, args.full_depth)
                                            for name in dict.fromkeys(n for n, _ in systems)}}
    ours, theirs = result["systems"]["ours INT4"], result["systems"]["llama.cpp Q4_0"]
    result["ours_over_llama_cpp"] = {k: ours[f"{k}_at_{args.full_depth}"] / theirs[f"{k}_at_{args.full_depth}"]
                                     for k in ("prefill_s", "decode_ms")}
    Path(args.output).write_text(json.dumps(result, indent=2))
    title = f"4B widths, same weights, {result['threads']} threads, depths {result['depths']}"
    full_depth_chart(result["systems"], args.full_depth, result["prompt_tokens"], title, Path(args.output).with_suffix(".png"))
    print(json.dumps({n: {k: v for k, v in s.items() if k != "measured"} for n, s in result["systems"].items()}, indent=1))
    print("ours / llama.cpp:", result["ours_over_llama_cpp"])


if __name__ == "__main__":
    main()
