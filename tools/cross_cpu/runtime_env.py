"""Environments with the device runtime only (this package's wheel installed without
dependencies, then onnxruntime, numpy, soundfile, soxr and tokenizers, as docs/jetson.md installs
them; no torch, no onnx), to run artifacts where users run them:

  aarch64  an ARM64 Python on this x86-64 machine, run by user-mode qemu-aarch64 (Debian's
           qemu-user): Debian's arm64 python3.11 unpacked into root/, the aarch64 wheels in site/
  venv     a virtual environment of this machine's Python, for another onnxruntime release
           (the oldest the package declares, say)

    python tools/cross_cpu/runtime_env.py aarch64 .aarch64-env [--onnxruntime 1.32.0]   # ~15 s, 260 MB
    python tools/cross_cpu/runtime_env.py venv .ort-floor-venv --onnxruntime 1.20.1
    python tools/cross_cpu/runtime_env.py features .aarch64-env --cpu cortex-a76   # what that CPU model reports
    python tools/cross_cpu/runtime_env.py run .aarch64-env --cpu max -- -m moss_edge.cli info ARTIFACT

CPU models: cortex-a76 has the feature set of a Jetson Orin's Cortex-A78AE and a Raspberry Pi 5
(NEON dot product, no i8mm, no SVE); neoverse-v1 that of an AWS Graviton3 (i8mm, bf16, SVE), so
ONNX Runtime takes its other ARM64 kernels; max has everything qemu emulates (SVE2 and SME too).
The environment carries its own qemu-aarch64, Debian bookworm-backports' (10.0): bookworm's 7.2
has no neoverse-v1 and mis-emulates SME (dynamic INT8 matrix products come out wrong on -cpu max
there, and right with qemu 10).

Why /proc/cpuinfo is written: user-mode qemu shows the guest the host's x86 /proc/cpuinfo, in
which ONNX Runtime's CPU detection (pytorch/cpuinfo) finds no ARM processor and crashes at import.
qemu opens a guest path under its prefix (-L) where the file exists there, so each CPU model
gets a prefix whose proc/cpuinfo lists that model's features, read from the hardware
capabilities (AT_HWCAP, AT_HWCAP2) qemu gives the guest.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = "usr/bin/python3.11"
# Debian bookworm's arm64 python3.11 and the libraries it and the runtime's wheels load.
DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "zlib1g", "libexpat1",
        "libssl3", "libffi8", "libbz2-1.0", "liblzma5", "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8",
        "libuuid1", "libcrypt1", "libnsl2", "libtirpc3", "libgcc-s1", "libstdc++6", "libgomp1"]
RUNTIME = ["numpy", "soundfile", "soxr", "tokenizers"]  # with onnxruntime: the device runtime, as docs/jetson.md installs it
# bookworm's glibc is 2.36: wheels for any manylinux up to it (pip does not widen a given tag itself)
PLATFORMS = [f"manylinux_2_{minor}_aarch64" for minor in range(36, 16, -1)] + ["manylinux2014_aarch64"]
# Linux's arm64 hwcap bits (arch/arm64/include/uapi/asm/hwcap.h), named as /proc/cpuinfo names them.
HWCAP = ["fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp", "cpuid",
         "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512", "sve", "asimdfhm",
         "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg"]
HWCAP2 = ["dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint", "svei8mm",
          "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte", "ecv", "afp", "rpres", "mte3",
          "sme", "smei16i64", "smef64f64", "smei8i32", "smef16f32", "smeb16f32", "smef32f32", "smefa64", "wfxt",
          "ebf16", "sveebf16", "cssc", "rprfm", "sve2p1", "sme2", "sme2p1", "smei16i32", "smebi32i32", "smeb16b16",
          "smef16f16", "mops", "hbc", "sveb16b16", "lrcpc3", "lse128", "fpmr", "lut", "faminmax", "f8cvt", "f8fma",
          "f8dp4", "f8dp2", "f8e4m3", "f8e5m2", "smelutv2", "smef8f16", "smef8f32", "smesf8fma", "smesf8dp4",
          "smesf8dp2", "poe"]
# MIDR fields qemu gives each model (implementer, variant, part, revision): the part names the core to cpuinfo.
MIDR = {"cortex-a76": (0x41, 4, 0xD0B, 1), "neoverse-v1": (0x41, 1, 0xD40, 1), "max": (0x00, 0, 0x051, 0)}
BACKPORTS = "deb http://deb.debian.org/debian bookworm-backports main"
QEMU = "qemu/usr/bin/qemu-aarch64"


def _qemu_from_backports(env: Path) -> None:
    """qemu-user from bookworm-backports, unpacked into env/qemu (apt's own lists are left alone)."""
    lists = env / "apt"
    for d in ("lists/partial", "cache/archives/partial"):
        (lists / d).mkdir(parents=True)
    (lists / "sources.list").write_text(BACKPORTS + "\n")
    options = ["-o", f"Dir::Etc::SourceList={lists / 'sources.list'}", "-o", "Dir::Etc::SourceParts=-",
               "-o", f"Dir::State::Lists={lists / 'lists'}", "-o", f"Dir::Cache={lists / 'cache'}",
               "-o", "APT::Get::List-Cleanup=0"]
    _run(["apt-get", *options, "update", "-q"])
    _run(["apt-get", *options, "download", "qemu-user"], cwd=lists)
    _run(["dpkg-deb", "-x", str(next(lists.glob("qemu-user_*.deb"))), str(env / "qemu")])
    shutil.rmtree(lists)


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done


def _wheel(into: Path, pip: list[str]) -> None:
    """This package as a device gets it: a wheel (built from a copy: setuptools leaves build/
    where it builds, and reuses it), installed without dependencies."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "source"
        shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".*", "build", "tests", "benchmarks", "tools",
                                                                     "__pycache__", "*.egg-info"))
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp, str(source)])
        _run([*pip, "install", "-q", "--no-deps", *into_args(into), str(next(Path(tmp).glob("moss_audio_edge-*.whl")))])


def into_args(into: Path | None) -> list[str]:
    return ["--target", str(into)] if into is not None else []


def make_aarch64(env: Path, onnxruntime: str) -> None:
    """root/ (Debian arm64 python3.11) and site/ (the aarch64 wheels) at env."""
    if "arm64" not in _run(["dpkg", "--print-foreign-architectures"]).stdout.split():
        if os.geteuid() != 0:
            raise SystemExit("apt must know arm64 packages: sudo dpkg --add-architecture arm64 && sudo apt-get update")
        _run(["dpkg", "--add-architecture", "arm64"])
        _run(["apt-get", "update", "-q"])
    staging = env.with_name(env.name + ".partial")  # complete or absent: a killed run leaves only this
    shutil.rmtree(staging, ignore_errors=True)
    debs, root, site = staging / "debs", staging / "root", staging / "site"
    for d in (debs, root, site):
        d.mkdir(parents=True)
    done = subprocess.run(["apt-get", "download", *[f"{p}:arm64" for p in DEBS]], cwd=debs, capture_output=True, text=True)
    if done.returncode != 0:  # the package lists may be stale or never read for arm64
        _run(["apt-get", "update", "-q"])
        _run(["apt-get", "download", *[f"{p}:arm64" for p in DEBS]], cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    shutil.rmtree(debs)
    _qemu_from_backports(staging)
    pip = [sys.executable, "-m", "pip"]
    _wheel(site, pip)
    _run([*pip, "install", "-q", "--target", str(site), "--upgrade", "--only-binary=:all:",
          *[f"--platform={p}" for p in PLATFORMS], "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
          f"onnxruntime=={onnxruntime}", *RUNTIME])
    (staging / "env.json").write_text(json.dumps({"kind": "aarch64", "onnxruntime": onnxruntime}) + "\n")
    shutil.rmtree(env, ignore_errors=True)
    staging.rename(env)


def make_venv(env: Path, onnxruntime: str) -> None:
    """A virtual environment of this Python at env with the runtime on onnxruntime==onnxruntime.
    Made in place (a venv names its folder in its scripts); env.json, written last, marks it whole."""
    shutil.rmtree(env, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(env)])
    pip = [str(env / "bin" / "python"), "-m", "pip"]
    _run([*pip, "install", "-q", f"onnxruntime=={onnxruntime}", *RUNTIME])
    _wheel(None, pip)
    (env / "env.json").write_text(json.dumps({"kind": "venv", "onnxruntime": onnxruntime}) + "\n")


def _guest(env: Path, prefix: Path, cpu: str, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    # PYTHONNOUSERSITE and a clean PYTHONPATH: the guest sees only site/, none of the host's packages
    guest_env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(env / "site"), "PYTHONNOUSERSITE": "1",
                 "HOME": os.environ.get("HOME", "/tmp"), "LANG": "C.UTF-8"}
    guest_env.update(kwargs.pop("extra_env", {}))
    return subprocess.run([str(env / QEMU), "-cpu", cpu, "-L", str(prefix), str(env / "root" / PYTHON), "-P", *args],
                          env=guest_env, **kwargs)


def features(env: Path, cpu: str) -> list[str]:
    """The feature names of cpu's hardware capabilities, as Linux lists them in /proc/cpuinfo."""
    script = ("import ctypes; f = ctypes.CDLL(None).getauxval; f.restype = ctypes.c_ulong; "
              "print(f(16), f(26))")  # AT_HWCAP, AT_HWCAP2
    done = _guest(env, env / "root", cpu, ["-c", script], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"the aarch64 Python in {env} does not start: {done.stderr[-2000:]}")
    hwcap, hwcap2 = map(int, done.stdout.split())
    return [n for i, n in enumerate(HWCAP) if hwcap >> i & 1] + [n for i, n in enumerate(HWCAP2) if hwcap2 >> i & 1]


def prefix(env: Path, cpu: str) -> Path:
    """env/cpu/<model>: root's folders linked, with this model's proc/cpuinfo."""
    if cpu not in MIDR:
        raise SystemExit(f"no MIDR known for -cpu {cpu}; the models here are {', '.join(MIDR)}")
    folder = env / "cpu" / cpu
    if (folder / "proc" / "cpuinfo").is_file():
        return folder
    staging = folder.with_name(cpu + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "proc").mkdir(parents=True)
    for entry in (env / "root").iterdir():
        (staging / entry.name).symlink_to(entry)
    implementer, variant, part, revision = MIDR[cpu]
    block = (f"BogoMIPS\t: 50.00\nFeatures\t: {' '.join(features(env, cpu))}\nCPU implementer\t: 0x{implementer:02x}\n"
             f"CPU architecture: 8\nCPU variant\t: 0x{variant:x}\nCPU part\t: 0x{part:03x}\nCPU revision\t: {revision}\n")
    cores = os.cpu_count() or 1  # the host's: /sys, which the guest reads too, describes these
    (staging / "proc" / "cpuinfo").write_text("".join(f"processor\t: {i}\n{block}\n" for i in range(cores)))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def run(env: Path, cpu: str | None, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """The environment's Python with args: an aarch64 one on CPU model cpu (default cortex-a76)."""
    kind = json.loads((env / "env.json").read_text())["kind"] if (env / "env.json").is_file() else None
    if kind == "venv":
        if cpu is not None:
            raise SystemExit(f"{env} runs on this machine's CPU; --cpu is for aarch64 environments")
        return subprocess.run([str(env / "bin" / "python"), "-P", *args], **kwargs)
    if kind != "aarch64":
        raise SystemExit(f"{env} is not an environment made by this tool: python {Path(__file__).name} aarch64 {env}")
    return _guest(env, prefix(env, cpu or "cortex-a76"), cpu or "cortex-a76", args, **kwargs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="command", required=True)
    for kind, what in (("aarch64", "make an aarch64 environment"), ("venv", "make a virtual environment of this Python")):
        p = sub.add_parser(kind, help=what)
        p.add_argument("env", type=Path)
        p.add_argument("--onnxruntime", default="1.32.0", help="the onnxruntime release to install")
    p = sub.add_parser("features", help="the features an aarch64 CPU model reports")
    p.add_argument("env", type=Path)
    p.add_argument("--cpu", default="cortex-a76", choices=sorted(MIDR))
    p = sub.add_parser("run", help="run the environment's Python with the arguments after --")
    p.add_argument("env", type=Path)
    p.add_argument("--cpu", choices=sorted(MIDR), help="aarch64 environments: the CPU model (default cortex-a76)")
    argv = sys.argv[1:]
    guest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    env = a.env.resolve()
    if a.command in ("aarch64", "venv"):
        (make_aarch64 if a.command == "aarch64" else make_venv)(env, a.onnxruntime)
        print(f"{a.env}: {a.command} environment with onnxruntime {a.onnxruntime}")
    elif a.command == "features":
        print(" ".join(features(env, a.cpu)))
    else:
        return run(env, a.cpu, guest_args).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
