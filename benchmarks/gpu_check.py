"""One GPU check: the GPU tests and the four benchmarks, each in its own subprocess with its own timeout, then one JSON
with every figure next to its target.

Steps (in this order; a step that fails or runs out of time is recorded and the next one runs):
  env          device, versions, a bf16 8192^3 matmul (the measured peak, beside the 989 TFLOP/s datasheet figure)
  tests        pytest tests/gpu/test_gpu.py
  tokenizer    bench_tokenizer.py: official size (EVA ViT-g/14 + 12-block merger + 16384 codes), batch 128, bf16
  caption      bench_causal_lm.py --parts caption: LLaMA-2-7B-size LaVIT, bf16: caption throughput at batch 32 vs a
               fixed 576-token image (and the prefill alone)
  image_tokens bench_causal_lm.py --parts image: the same model, image-token generation at batch 1 with CFG
               (dynamic cache, static cache, static cache + compiled step)
  training     bench_training.py: stage 2 on the ~1.17B LM, padded vs packed rows (SDPA), tokens/s and MFU
  detokenizer  bench_detokenizer.py: 512x512 synthesis (7B LM tokens with guidance + SD-1.5-size UNet + VAE), CFG
               halves batched vs sequential
  training_flex  as training, all segments in one packed row with FlexAttention (compiles; gets what is left)
  training_kernels  as training_flex, with Liger's kernels (use_liger_kernel), with pure bf16 weights (Kahan-summed
               AdamW) instead of AMP, and with both: each beside the FlexAttention row of training_flex (issue 30)
Issue 30's other pairs run inside the steps above: caption (dynamic cache vs the static cache that transformers
compiles, LaVIT's CUDA default, for both LMs), image_tokens (dynamic / static / static + compiled), detokenizer
(token generation with the CUDA defaults vs dynamic uncompiled).
Targets (issue 16): tokenizer whole path >= 3x the official code's 301 img/s (H100, batch 128); caption >= 4x the
fixed-576 LM at batch 32; image-token generation with CFG >= 100 tokens/s at batch 1 (7B); packed >= 1.3x padded;
MFU >= 45%; seconds per 512x512 image (reported, no target). Random weights everywhere (speed does not depend on them).
cuDNN SDPA is switched off in every benchmark: it plans per shape and was erratic with shapes that change every batch
(shared/research/gpu_anchors.md).

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py --out $OUT            # on the GPU, about 7 minutes
    python benchmarks/gpu_check.py --dry-run --out /tmp/check               # tiny sizes on the CPU
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OFFICIAL_TOKENIZER_IMAGES_PER_S = 301.1  # official code, H100, bf16, batch 128 (gpu_anchors.md section A)
H100_DENSE_BF16_TFLOPS = 989.0

ENV_PROBE = """
import importlib.metadata, json, platform, sys, time, torch
versions = {}
for name in ("torch", "transformers", "diffusers", "datasets", "accelerate", "peft", "huggingface_hub", "tokenizers",
             "safetensors", "pyarrow", "fsspec", "lavit"):
    try:
        versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        versions[name] = None
result = {"python": sys.version.split()[0], "versions": versions, "cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    result["device"] = torch.cuda.get_device_name()
    result["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    result["matmul_bf16_tflops"] = 2 * n**3 * 20 / (time.perf_counter() - start) / 1e12
else:
    result["device"] = platform.processor() or platform.machine()
print("ENV " + json.dumps(result))
"""

# issue 30's training options beside the FlexAttention row (bench_training.py's "+option" syntax)
KERNEL_VARIANTS = "packed 1 row +liger,packed 1 row +bf16,packed 1 row +liger +bf16"

# every benchmark runs with cuDNN SDPA off (see the module docstring), then as its own __main__
LAUNCH = ("import runpy, sys, torch; torch.backends.cuda.enable_cudnn_sdp(False); sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__')")


def steps(dry_run: bool, results: Path) -> list[dict]:
    """name, command and timeout (s) of every step, most wanted first; tiny sizes on the CPU with `dry_run`. A
    benchmark writes its JSON to `results / f"{name}.json"`."""
    # -P: the repository root is not put on sys.path, so its `lavit/` folder (the namespace's sources only) cannot
    # shadow the installed package, which maps `lavit.modeling` etc. onto the other folders
    python = [sys.executable, "-P"]
    if dry_run:
        arguments = dict(
            tokenizer=["--sizes", "small", "--batch-sizes", "2", "--dtype", "float32", "--warmup", "0", "--repeats",
                       "1"],
            caption=["--size", "tiny", "--parts", "caption", "--batch-sizes", "2", "--new-tokens", "3", "--warmup", "0",
                     "--repeats", "1"],
            image_tokens=["--size", "tiny", "--parts", "image", "--image-tokens", "4", "--warmup", "0", "--repeats",
                          "1"],
            training=["--size", "tiny", "--rows", "1", "--row-length", "256", "--steps", "1", "--warmup", "1",
                      "--gradient-checkpointing", "off", "--variants", "padded,packed rows"],
            detokenizer=["--size", "tiny", "--image-tokens", "4", "--repeats", "1", "--steps", "2"],
            # FlexAttention has no CPU backward: on the CPU this step only checks that it runs and is skipped
            training_flex=["--size", "tiny", "--rows", "1", "--row-length", "256", "--steps", "1", "--warmup", "1",
                           "--gradient-checkpointing", "off", "--variants", "packed 1 row"],
            # Liger needs a GPU too: on the CPU only the pure-bf16 row runs
            training_kernels=["--size", "tiny", "--rows", "1", "--row-length", "256", "--steps", "1", "--warmup", "1",
                              "--gradient-checkpointing", "off", "--variants", f"packed rows +bf16,{KERNEL_VARIANTS}"],
        )
        timeouts = dict(env=60, tests=120, tokenizer=120, caption=120, image_tokens=120, training=120, detokenizer=120,
                        training_flex=120, training_kernels=120)
    else:
        training = ["--size", "1b", "--rows", "4", "--row-length", "2048", "--steps", "4", "--warmup", "2",
                    "--gradient-checkpointing", "off", "--peak-tflops", str(H100_DENSE_BF16_TFLOPS)]
        arguments = dict(
            tokenizer=["--sizes", "official", "--batch-sizes", "128", "--dtype", "bfloat16", "--warmup", "2",
                       "--repeats", "5"],
            caption=["--size", "7b", "--dtype", "bfloat16", "--parts", "caption", "--batch-sizes", "32",
                     "--new-tokens", "10", "--warmup", "2", "--repeats", "3"],
            # warmup 2: the compiled decoding step compiles in the first call and settles in the second
            image_tokens=["--size", "7b", "--dtype", "bfloat16", "--parts", "image", "--image-tokens", "64",
                          "--warmup", "2", "--repeats", "3"],
            training=[*training, "--variants", "padded,packed rows"],
            detokenizer=["--size", "official", "--dtype", "bfloat16", "--image-tokens", "85", "--repeats", "2"],
            training_flex=[*training, "--variants", "packed 1 row"],  # compiles FlexAttention: late
            training_kernels=[*training, "--variants", KERNEL_VARIANTS],  # last: a rerun's `--only training_kernels`
        )
        timeouts = dict(env=60, tests=150, tokenizer=90, caption=120, image_tokens=150, training=100,
                        detokenizer=150, training_flex=120, training_kernels=240)
    scripts = dict(tokenizer="bench_tokenizer.py", caption="bench_causal_lm.py", image_tokens="bench_causal_lm.py",
                   training="bench_training.py", detokenizer="bench_detokenizer.py", training_flex="bench_training.py",
                   training_kernels="bench_training.py")
    output_flags = dict(tokenizer="--out", caption="--json", image_tokens="--json", training="--json",
                        detokenizer="--output", training_flex="--json", training_kernels="--json")
    chosen = [
        dict(name="env", command=[*python, "-c", ENV_PROBE], timeout=timeouts["env"]),
        dict(name="tests", command=[*python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu/test_gpu.py"],
             timeout=timeouts["tests"]),
    ]
    for name in scripts:
        command = [*python, "-c", LAUNCH, str(HERE / scripts[name]), *arguments[name], output_flags[name],
                   str(results / f"{name}.json")]
        chosen.append(dict(name=name, command=command, timeout=timeouts[name]))
    return chosen


def run_step(step: dict, timeout: float, log) -> dict:
    """Runs one step in its own process group, echoing its output with a prefix; kills the group at `timeout`."""
    start = time.perf_counter()
    print(f"[gpu_check] {step['name']}: start (timeout {timeout:.0f} s)", flush=True)
    process = subprocess.Popen(step["command"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []

    def pump():
        for line in process.stdout:
            lines.append(line)
            log.write(f"[{step['name']}] {line}")
            print(f"[{step['name']}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        returncode = process.wait(timeout=max(timeout, 1))
        status = "ok" if returncode == 0 else f"failed (exit status {returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = f"timed out after {timeout:.0f} s"
    reader.join(timeout=5)
    seconds = time.perf_counter() - start
    print(f"[gpu_check] {step['name']}: {status} in {seconds:.1f} s", flush=True)
    return dict(status=status, seconds=round(seconds, 1), output_tail="".join(lines[-15:]))


def _row(rows: list[dict], **match) -> dict | None:
    return next((row for row in rows if all(row.get(key) == value for key, value in match.items())), None)


def tokenizer_figures(result: dict, earlier: dict) -> list[dict]:
    rows = result["results"]
    batch = max(row["batch_size"] for row in rows)
    figures = []
    for attention in ("exact", "official"):
        row = _row(rows, attention=attention, batch_size=batch)
        if row:
            value = row["whole"]["images_per_s"]
            figures.append(dict(
                name=f"tokenizer whole path, {attention} attention, batch {batch} (img/s)", value=value,
                target=f">= {3 * OFFICIAL_TOKENIZER_IMAGES_PER_S:.0f} (3x official 301)",
                met=value >= 3 * OFFICIAL_TOKENIZER_IMAGES_PER_S,
                detail=dict(times_official=value / OFFICIAL_TOKENIZER_IMAGES_PER_S,
                            post_encoder_images_per_s=row["post"]["images_per_s"],
                            encoder_images_per_s=row["encoder"]["images_per_s"],
                            tokens_per_image=row["tokens_per_image"], peak_memory_gib=row["whole"]["peak_memory_gib"]),
            ))
    return figures


def causal_lm_figures(result: dict, earlier: dict) -> list[dict]:
    rows = result["rows"]
    figures = []
    batch = max((row["batch_size"] for row in rows if row["name"] == "lavit caption"), default=None)
    lavit, fixed = _row(rows, name="lavit caption", batch_size=batch), _row(rows, name="fixed576 caption",
                                                                          batch_size=batch)
    if lavit and fixed:
        ratio = lavit["images_per_s"] / fixed["images_per_s"]
        figures.append(dict(name=f"caption throughput vs fixed 576 tokens, batch {batch} (x)", value=ratio,
                            target=">= 4", met=ratio >= 4,
                            detail=dict(lavit_images_per_s=lavit["images_per_s"],
                                        fixed576_images_per_s=fixed["images_per_s"],
                                        lavit_prompt_tokens=lavit["prompt_tokens_per_image"])))
    lavit_static, fixed_static = (_row(rows, name=f"{kind} caption static", batch_size=batch)
                                  for kind in ("lavit", "fixed576"))
    if lavit_static and fixed_static:
        ratio = lavit_static["images_per_s"] / fixed_static["images_per_s"]
        figures.append(dict(name=f"caption vs fixed 576 tokens, both static cache + compiled, batch {batch} (x)",
                            value=ratio, target=">= 4", met=ratio >= 4,
                            detail=dict(lavit_images_per_s=lavit_static["images_per_s"],
                                        fixed576_images_per_s=fixed_static["images_per_s"])))
    if lavit and lavit_static:  # the CUDA default of `generate` against the dynamic cache
        figures.append(dict(name=f"lavit caption static + compiled / dynamic, batch {batch} (x)",
                            value=lavit_static["images_per_s"] / lavit["images_per_s"], target="reported", met=None))
    image_rows = [row for row in rows if row["name"].startswith("image tokens cfg=4")]
    for row in image_rows:
        figures.append(dict(name=f"{row['name']}, batch 1 (tokens/s)", value=row["tokens_per_s"], target=">= 100",
                            met=row["tokens_per_s"] >= 100))
    return figures


def training_figures(result: dict, earlier: dict) -> list[dict]:
    """Packed / padded speed-up and MFU; the padded row of the `training` step serves the later steps too. A row
    with options ("packed 1 row +liger") is also compared with its layout's row without them (this step's or an
    earlier one's)."""
    rows = [row for row in result["results"] if not row.get("error")]
    earlier_rows = [row for step in ("training", "training_flex")
                    for row in earlier.get(step, {}).get("result", {}).get("results", []) if not row.get("error")]
    padded = _row(rows, variant="padded") or _row(earlier_rows, variant="padded")
    figures = []
    for row in rows:
        layout = row["variant"].split(" +")[0]
        base = (_row(rows, variant=layout) or _row(earlier_rows, variant=layout)) if layout != row["variant"] else None
        if base:
            figures.append(dict(name=f"{row['variant']} / {layout} tokens/s (x)",
                                value=row["tokens_per_s"] / base["tokens_per_s"], target="reported", met=None,
                                detail=dict(peak_memory_gib=row["peak_memory_gib"],
                                            base_peak_memory_gib=base["peak_memory_gib"])))
        if row["variant"] == "padded":
            continue
        if padded:
            ratio = row["tokens_per_s"] / padded["tokens_per_s"]
            figures.append(dict(name=f"{row['variant']} ({row['attention']}) / padded tokens/s (x)", value=ratio,
                                target=">= 1.3", met=ratio >= 1.3))
    for row in rows:
        figures.append(dict(name=f"MFU {row['variant']} ({row['attention']}) vs {result['peak_tflops']:.0f} TFLOP/s",
                            value=row["mfu"], target=">= 0.45", met=row["mfu"] >= 0.45,
                            detail=dict(tokens_per_s=row["tokens_per_s"], step_s=row["step_s"],
                                        padding_fraction=row["padding_fraction"],
                                        peak_memory_gib=row["peak_memory_gib"])))
    return figures


def detokenizer_figures(result: dict, earlier: dict) -> list[dict]:
    figures = []
    for row in result["rows"]:
        figures.append(dict(name=f"{row['decoder']} {row['height']}x{row['width']}: {row['variant']} (s per image)",
                            value=row["total_s"], target="reported", met=None,
                            detail={key: row.get(key) for key in ("tokens_s", "tokens_eager_s", "features_s",
                                                                   "unet_s", "vae_s")}))
    return figures


FIGURES = dict(tokenizer=tokenizer_figures, caption=causal_lm_figures, image_tokens=causal_lm_figures,
               training=training_figures, detokenizer=detokenizer_figures, training_flex=training_figures,
               training_kernels=training_figures)


def print_table(figures: list[dict]):
    print(f"\n{'step':<18}{'figure':<78}{'value':>12}  {'target':<26}met")
    for figure in figures:
        value = figure["value"]
        shown = f"{value * 100:.1f}%" if figure["name"].startswith("MFU") else f"{value:.2f}"
        met = {True: "yes", False: "NO", None: "-"}[figure["met"]]
        print(f"{figure['step']:<18}{figure['name'][:76]:<78}{shown:>12}  {figure['target']:<26}{met}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"),
                        help="folder for gpu_check.json and gpu_check.log (default: $OUT, else benchmarks/results)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the plumbing")
    parser.add_argument("--only", default=None, help="comma list of steps (default: all)")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds for all steps; a step gets at most what is left (default 450)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    report = dict(dry_run=args.dry_run, started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), steps={},
                  figures=[])
    with tempfile.TemporaryDirectory() as scratch, open(out / "gpu_check.log", "w") as log:
        chosen = steps(args.dry_run, Path(scratch))
        if args.only:
            names = args.only.split(",")
            unknown = sorted(set(names) - {step["name"] for step in chosen})
            if unknown:
                parser.error(f"--only: unknown step(s) {unknown}; steps: {[step['name'] for step in chosen]}")
            chosen = [step for step in chosen if step["name"] in names]
        for step in chosen:
            left = deadline - time.perf_counter()
            if left < 10:
                report["steps"][step["name"]] = dict(status="skipped: no time left in --budget")
                continue
            outcome = run_step(step, min(step["timeout"], left), log)
            result_file = Path(scratch) / f"{step['name']}.json"
            if step["name"] == "env":
                line = next((line for line in outcome["output_tail"].splitlines() if line.startswith("ENV ")), None)
                report["environment"] = json.loads(line[4:]) if line else None
            elif step["name"] in FIGURES and result_file.is_file():
                outcome["result"] = json.loads(result_file.read_text())
                try:
                    figures = FIGURES[step["name"]](outcome["result"], report["steps"])
                except (KeyError, ValueError, ZeroDivisionError) as error:
                    figures, outcome["status"] = [], f"{outcome['status']}; figures unreadable: {error!r}"
                report["figures"].extend(dict(step=step["name"], **figure) for figure in figures)
            report["steps"][step["name"]] = outcome
            (out / "gpu_check.json").write_text(json.dumps(report, indent=2))  # partial results survive a kill
    print_table(report["figures"])
    failed = [name for name, outcome in report["steps"].items() if outcome["status"] != "ok"]
    print(f"\nsteps not ok: {failed or 'none'}; wrote {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
