"""llama.cpp on the same weights: build llama-bench, convert a checkpoint to GGUF q8_0, time prefill and decode.

    .venv/bin/python bench/llama_cpp.py /work/v2/lite --out runs/llama_cpp_v2_lite.json     # full size
    .venv/bin/python bench/llama_cpp.py /tmp/lite2 --reps 2 --gguf /tmp/lite2-q8_0.gguf     # a cut checkpoint
    .venv/bin/python bench/llama_cpp.py CKPT --threads 2 --reps 3 --work /work/llamacpp --gguf PATH

llama.cpp's source comes from the llama-cpp-python sdist on PyPI (`pip download --no-binary`), whose
vendor/llama.cpp tree is extracted under --work; llama-bench (and llama-simple) are built there once
with cmake (Release, CPU only, -DGGML_NATIVE=ON, curl and openssl off, -j2) and the build time is kept
in build/build_seconds.json for later runs. A Hugging Face DeepSeek-V2 checkpoint directory is converted
to GGUF q8_0 by that tree's convert_hf_to_gguf.py, run by this interpreter (skipped when --gguf exists).
The converter runs through a small wrapper that changes two things:
- PRE-TOKENIZER FORCED: dsv2's checkpoints carry their own byte-level BPE, whose pre-tokenizer hash
  the converter does not know, so get_vocab_base_pre returns "deepseek-llm" (DeepSeek-V2's own). It
  only decides how text is split before BPE; llama-bench times token ids, so speed is unaffected.
- q_lora_rank 0 is written when the config has none (V2-Lite): llama.cpp recognises V2-Lite by its
  27 layers and otherwise requires the key, so without it a checkpoint cut by --layers would not load.
llama-bench then runs `-p 512 -n 0` (prefill tokens/s at 512) and `-p 0 -n 64` (decode tokens/s,
batch 1) once with the weights mmapped (its default) and once read into memory (`--load-mode none`
in this tree, `-mmp 0` in older ones), each under /usr/bin/time -v for its peak RSS. With mmap the
weight pages count in RSS once touched but are page cache that the kernel may drop.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from dsv2.bench.common import cpu_name

WRAPPER = """import runpy, sys
tree = sys.argv.pop(1)
sys.path[:0] = [tree, tree + '/gguf-py']
import conversion.base
# dsv2's tokenizer is not in the converter's hash table; DeepSeek-V2's pre-tokenizer is
# 'deepseek-llm'. It decides how text is split before BPE, nothing about speed.
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'deepseek-llm'
# llama.cpp tells V2-Lite (no q_lora) by its 26/27 layers and otherwise requires q_lora_rank;
# writing 0 (V2-Lite's "none") lets a checkpoint cut to fewer layers load too.
import conversion.deepseek as ds
set_params = ds.DeepseekV2Model.set_gguf_parameters
def set_gguf_parameters(self):
    set_params(self)
    if self.hparams.get('q_lora_rank') is None:
        self.gguf_writer.add_q_lora_rank(0)
ds.DeepseekV2Model.set_gguf_parameters = set_gguf_parameters
sys.argv[0] = tree + '/convert_hf_to_gguf.py'
runpy.run_path(sys.argv[0], run_name='__main__')
"""
CONVERTER_DEPS = {"gguf-py": [("tqdm", "tqdm"), ("yaml", "pyyaml"), ("requests", "requests")],
                  "converter": [("torch", "torch"), ("transformers", "transformers"), ("safetensors", "safetensors")]}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--work", default="/work/llamacpp", help="where the sdist, its tree and the build live")
    p.add_argument("--gguf", help="GGUF path (default: WORK/<checkpoint name>-q8_0.gguf); reused if it exists")
    p.add_argument("--threads", type=int, default=2, help="llama-bench -t")
    p.add_argument("--reps", type=int, default=3, help="llama-bench -r (repetitions per test)")
    p.add_argument("--prompt", type=int, default=512, help="prefill length (-p)")
    p.add_argument("--gen", type=int, default=64, help="decode tokens (-n)")
    p.add_argument("--out", help="write the results as JSON here")
    return p.parse_args(argv)


def run(cmd, log=None, **kw):
    """Run cmd; on failure stop with its last output lines."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if log:
        Path(log).write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-25:])
        sys.exit(f"{tail}\n`{' '.join(map(str, cmd[:4]))} ...` failed with exit status {r.returncode}.")
    return r


def source_tree(work: Path) -> tuple[Path, str]:
    """The sdist's vendor/llama.cpp under work (downloaded and extracted only when absent), and its version."""
    trees = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if not trees:
        sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            print(f"downloading the llama-cpp-python sdist into {work}", flush=True)
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "llama-cpp-python", "-d", work])
            sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdists[-1]) as tf:
            tf.extractall(work, filter="data")
        trees = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    tree = trees[-1].parent
    return tree, tree.parents[1].name.removeprefix("llama_cpp_python-")


def commit_of(tree: Path) -> str:
    """The llama.cpp commit: from the tree's git metadata (the sdist ships it), else its CHANGELOG line."""
    r = subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode == 0 and subprocess.run(["git", "-C", tree, "rev-parse", "--show-toplevel"], capture_output=True,
                                            text=True).stdout.strip() == str(tree):
        return r.stdout.strip()
    m = re.search(r"llama\.cpp@([0-9a-f]+)", (tree.parents[1] / "CHANGELOG.md").read_text())
    return m.group(1) if m else "unknown"


def build(tree: Path, work: Path) -> tuple[Path, float]:
    """Build llama-bench and llama-simple once; return the bench binary and the recorded build seconds."""
    bdir = work / "build"
    bench, record = bdir / "bin" / "llama-bench", bdir / "build_seconds.json"
    if bench.exists():              # built before: its recorded time (nan if built by hand)
        return bench, json.loads(record.read_text())["seconds"] if record.exists() else float("nan")
    print(f"building llama-bench in {bdir} (cmake Release, CPU, GGML_NATIVE, -j2; about 6 minutes on 2 cores)",
          flush=True)
    t0 = time.perf_counter()
    run(["cmake", "-S", tree, "-B", bdir, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
         "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF"],
        log=work / "configure.log")
    run(["cmake", "--build", bdir, "--config", "Release", "-j2", "--target", "llama-bench", "llama-simple"],
        log=work / "build.log")
    seconds = time.perf_counter() - t0
    record.write_text(json.dumps({"seconds": seconds, "targets": ["llama-bench", "llama-simple"]}))
    return bench, seconds


def ensure_converter_deps():
    """pip-install into this interpreter what gguf-py and the converter import and it lacks (sentencepiece
    and protobuf are only for SentencePiece vocabularies, not needed for a byte-level BPE)."""
    missing = [pkg for deps in CONVERTER_DEPS.values() for mod, pkg in deps if importlib.util.find_spec(mod) is None]
    if missing:
        print(f"installing the converter's missing dependencies: {' '.join(missing)}", flush=True)
        run([sys.executable, "-m", "pip", "install", *missing])


def convert(ckpt: Path, tree: Path, gguf: Path) -> float:
    """Convert ckpt to GGUF q8_0 once; return the conversion seconds (recorded next to the GGUF)."""
    record = gguf.with_name(gguf.name + ".convert.json")
    if gguf.exists():
        return json.loads(record.read_text())["seconds"] if record.exists() else float("nan")
    ensure_converter_deps()
    print(f"converting {ckpt} to {gguf} (q8_0; pre-tokenizer forced to 'deepseek-llm', which does not "
          "affect speed)", flush=True)
    part = gguf.with_name(gguf.name + ".part")
    t0 = time.perf_counter()
    run([sys.executable, "-c", WRAPPER, tree, ckpt, "--outtype", "q8_0", "--outfile", part],
        log=gguf.with_name(gguf.name + ".convert.log"))
    seconds = time.perf_counter() - t0
    part.rename(gguf)
    record.write_text(json.dumps({"seconds": seconds, "checkpoint": str(ckpt)}))
    return seconds


def llama_bench(bench: Path, gguf: Path, args, test: list[str], load: list[str]) -> dict:
    """One llama-bench process under /usr/bin/time -v: its JSON result and peak RSS."""
    with tempfile.NamedTemporaryFile("r", suffix=".time-v") as timing:
        r = run(["/usr/bin/time", "-v", "-o", timing.name, bench, "-m", gguf, *test, "-t", args.threads,
                 "-r", args.reps, "-o", "json", *load])
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing.read()).group(1))
    res = json.loads(r.stdout)[0]
    return {"tokens_per_s": res["avg_ts"], "stddev": res["stddev_ts"], "peak_rss_gib": rss_kb / 2**20,
            "load": " ".join(load) or "default (mmap)", "n_prompt": res["n_prompt"], "n_gen": res["n_gen"],
            "raw": res}


def main(argv=None) -> int:
    args = _args(argv)
    ckpt = Path(args.checkpoint).resolve()
    if not (ckpt / "config.json").is_file():
        sys.exit(f"{ckpt} is not a checkpoint directory (no config.json).")
    if not list(ckpt.glob("*.safetensors")):
        sys.exit(f"{ckpt} holds no .safetensors weights.")
    if not (ckpt / "tokenizer.json").is_file():
        sys.exit(f"{ckpt} has no tokenizer.json, which the GGUF vocabulary is made from.")
    if not Path("/usr/bin/time").exists():
        sys.exit("/usr/bin/time is missing (apt-get install time); it measures llama-bench's peak RSS.")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    gguf = Path(args.gguf).resolve() if args.gguf else work / f"{ckpt.name}-q8_0.gguf"
    tree, version = source_tree(work)
    bench, build_s = build(tree, work)
    convert_s = convert(ckpt, tree, gguf)
    help_text = subprocess.run([bench, "--help"], capture_output=True, text=True).stdout
    no_mmap = ["--load-mode", "none"] if "--load-mode" in help_text else ["-mmp", "0"] if "-mmp" in help_text else None
    loads = [[]] + ([no_mmap] if no_mmap else [])
    load_avg, rows = os.getloadavg()[0], []
    print(f"llama-bench on {gguf.name} ({gguf.stat().st_size / 2**30:.2f} GiB), {args.threads} threads, "
          f"{args.reps} reps, load average {load_avg:.1f} (other processes slow it)", flush=True)
    for load in loads:
        for test in (["-p", args.prompt, "-n", 0], ["-p", 0, "-n", args.gen]):
            rows.append(llama_bench(bench, gguf, args, test, load))
    raw = rows[0]["raw"]
    result = {"llama_cpp_python_sdist": version, "llama_cpp_commit": commit_of(tree),
              "llama_cpp_build": f"{raw.get('build_commit')} ({raw.get('build_number')})",
              "cpu": cpu_name(), "checkpoint": str(ckpt), "gguf": str(gguf),
              "gguf_gib": gguf.stat().st_size / 2**30, "model_params": raw.get("model_n_params"),
              "build_seconds": build_s, "convert_seconds": convert_s, "threads": args.threads, "reps": args.reps,
              "load_avg_before": load_avg, "load_avg_after": os.getloadavg()[0],
              "pre_tokenizer": "deepseek-llm (forced; no effect on speed)",
              "prefill_tokens_per_s": rows[0]["tokens_per_s"], "decode_tokens_per_s": rows[1]["tokens_per_s"],
              "peak_rss_gib": {"mmap": max(rows[0]["peak_rss_gib"], rows[1]["peak_rss_gib"]),
                               **({"no_mmap": max(rows[2]["peak_rss_gib"], rows[3]["peak_rss_gib"])}
                                  if no_mmap else {})},
              "runs": [{k: v for k, v in r.items() if k != "raw"} for r in rows], "llama_bench_raw": [r["raw"] for r in rows]}
    print(f"llama.cpp {result['llama_cpp_commit'][:10]} (llama-cpp-python {version} sdist), {result['cpu']}")
    print(f"build {build_s:.0f} s, conversion {convert_s:.0f} s, GGUF q8_0 {result['gguf_gib']:.2f} GiB, "
          f"{raw.get('model_n_params', 0) / 1e9:.2f} B params; pre-tokenizer forced to deepseek-llm (no effect on speed)")
    print(f"{'test':<10} {'weights':<18} {'tokens/s':>9} {'+-':>6} {'peak RSS GiB':>13}")
    for r in rows:
        name = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        print(f"{name:<10} {r['load']:<18} {r['tokens_per_s']:>9.2f} {r['stddev']:>6.2f} {r['peak_rss_gib']:>13.2f}")
    print("peak RSS with mmap counts the weight pages touched, which stay page cache the kernel can drop")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
