"""What the CPU has, as Linux reports it: the SIMD features that decide ONNX Runtime's kernels."""

from pathlib import Path

# Integer dot-product or matrix instructions, which ONNX Runtime's u8 x s8 GEMM uses: AMX tiles,
# AVX-512 / AVX VNNI (x86), SDOT/UDOT and the 8-bit matrix multiply (ARM64). Without them x86
# multiplies with vpmaddubsw, and the INT4 MatMulNBits kernels stay the prompt path.
INTEGER_DOT_PRODUCT = ("amx_int8", "avx512_vnni", "avx_vnni", "asimddp", "i8mm")


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's feature words (x86 'flags', ARM64 'Features'); empty if unknown."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return set()
    line = next((x for x in lines if x.startswith(("flags", "Features"))), ":")
    return set(line.split(":", 1)[1].split())


def integer_dot_product(features: set[str]) -> list[str]:
    """Which of INTEGER_DOT_PRODUCT the features include."""
    return [f for f in INTEGER_DOT_PRODUCT if f in features]
