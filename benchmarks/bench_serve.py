"""Throughput and latency of `lavit serve`: requests/s and p50/p95 latency at 1, 8 and 32 concurrent clients, with
request batching (`@serve.batch`, up to --max-batch-size requests in one `generate`) and one request at a time
(max batch size 1), side by side in one run: one local Ray instance, two applications (`/batched`, `/single`) with
one model replica each, the official `openai` client in threads, modes alternated at every concurrency level.

Each request: one image (data URL) + a short question, seeded sampling, --max-tokens new tokens. Without --model
a tiny LaVIT (tiny visual tokenizer + a small random LLaMA, `lavit.training.language_model`) is built first.

    python benchmarks/bench_serve.py                          # CPU, tiny model
    python benchmarks/bench_serve.py --model FOLDER --gpus-per-replica 1 --dtype bfloat16   # a GPU, a real model
"""

import argparse
import base64
import io
import json
import platform
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

TEXTS = ["a photo of a cat sitting on a red sofa", "two dogs play in the park", "a man rides a bicycle",
         "question: what color is the bus? answer: red", "a bowl of coffee on a wooden table", "a close up of a flower"]


def build_tiny_model(folder: Path) -> Path:
    """A tiny LaVIT folder: the `tokenizer_tiny` preset visual tokenizer (threshold selection) and a small random
    LLaMA, untrained."""
    import torch
    from lavit.training.arguments import load_config_preset
    from lavit.training.language_model import write_small_language_model
    from lavit.training.models import build_unified_model

    from lavit import LaVITTokenizerConfig, LaVITTokenizerModel

    torch.manual_seed(0)
    # the official selector keeps patches above a threshold; the tiny preset samples them, which makes the server
    # draw each request's keep masks apart (a second visual tokenizer pass), so the benchmark uses the threshold
    settings = {**load_config_preset("tiny", "tokenizer"), "selection_mode": "deterministic"}
    LaVITTokenizerModel(LaVITTokenizerConfig(**settings)).save_pretrained(folder / "tokenizer")
    write_small_language_model(folder / "lm", TEXTS * 4, vocab_size=200, hidden_size=64)
    model, processor = build_unified_model(SimpleNamespace(
        model=None, visual_tokenizer=str(folder / "tokenizer"), language_model=str(folder / "lm"), text_tokenizer=None))
    model.save_pretrained(folder / "lavit")
    processor.save_pretrained(folder / "lavit")
    return folder / "lavit"


def image_url(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def run_level(api, model_name: str, clients: int, requests: int, max_tokens: int, images: list[str]) -> dict:
    """`requests` chat requests from `clients` threads; requests/s over the wall time, latency percentiles."""

    def one(index: int) -> float:
        started = time.perf_counter()
        api.chat.completions.create(
            model=model_name, max_tokens=max_tokens, temperature=0.8, seed=index,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[index % 4]}},
                                                   {"type": "text", "text": TEXTS[index % len(TEXTS)]}]}])
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": requests, "requests_per_s": requests / wall,
            "p50_s": statistics.median(latencies), "p95_s": latencies[min(len(latencies) - 1,
                                                                           round(0.95 * (len(latencies) - 1)))]}


def engine_levels(model: str, sizes: list[int], max_tokens: int, images: list[str]) -> list[dict]:
    """The model replica's part alone, in this process: `sizes[i]` requests as one `run_batch` vs one by one (what
    batching saves when HTTP, Ray and request parsing cost nothing)."""
    from lavit.serving.engine import LaVITEngine, RequestPreparer
    from lavit.serving.schemas import ChatCompletionRequest, ServeLimits

    engine, preparer = LaVITEngine(model, device="cpu"), RequestPreparer(model, ServeLimits())
    jobs = [preparer.chat_job(ChatCompletionRequest(
        model="lavit", max_tokens=max_tokens, temperature=0.8, seed=index,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": images[index % 4]}},
                                               {"type": "text", "text": TEXTS[index % len(TEXTS)]}]}]))
        for index in range(max(sizes))]
    engine.run_batch(jobs[:2], lambda deltas: None)  # warm-up
    rows = []
    for size in sizes:
        for mode, batches in (("batched", [jobs[:size]]), ("single", [[job] for job in jobs[:size]])):
            started = time.perf_counter()
            for batch in batches:
                engine.run_batch(batch, lambda deltas: None)
            rows.append({"mode": mode, "requests": size, "requests_per_s": size / (time.perf_counter() - started)})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a LaVIT folder (default: build a tiny one)")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests per level: this x clients "
                        "(at least 16)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--gpus-per-replica", type=float, default=0.0)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--engine-only", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the replica's engine alone in this process (CPU)")
    parser.add_argument("--json", default="benchmarks/results/serve_tiny_cpu.json")
    args = parser.parse_args()

    import openai
    import ray
    from ray import serve

    from lavit.atomic import write_atomically
    from lavit.serving.deployments import ServeSettings, build_app

    model = args.model or str(build_tiny_model(Path(tempfile.mkdtemp(prefix="bench_serve_"))))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    modes = {"batched": args.max_batch_size, "single": 1}
    for mode, batch_size in modes.items():
        settings = ServeSettings(model=model, model_name="lavit", cpus_per_replica=0.5, max_batch_size=batch_size,
                                 gpus_per_replica=args.gpus_per_replica, dtype=args.dtype, batch_wait_timeout_s=0.01)
        serve.run(build_app(asdict(settings)), name=mode, route_prefix=f"/{mode}")
    apis = {mode: openai.OpenAI(base_url=f"http://127.0.0.1:{port}/{mode}/v1", api_key="unused", max_retries=0,
                                timeout=600) for mode in modes}
    images = [image_url(seed) for seed in range(4)]
    for mode in modes:  # warm-up: first-call costs out of the numbers
        run_level(apis[mode], "lavit", 2, 4, args.max_tokens, images)
    rows = []
    try:
        for clients in [int(item) for item in args.clients.split(",")]:
            requests = max(16, args.requests_per_client * clients)
            for mode in modes:
                rows.append({"mode": mode, **run_level(apis[mode], "lavit", clients, requests, args.max_tokens,
                                                       images)})
                print(f"{mode:8s} clients={clients:3d}  {rows[-1]['requests_per_s']:7.2f} req/s  "
                      f"p50 {rows[-1]['p50_s'] * 1000:8.1f} ms  p95 {rows[-1]['p95_s'] * 1000:8.1f} ms", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print_table(rows)
    engine_rows = []
    if args.engine_only and args.gpus_per_replica == 0:
        engine_rows = engine_levels(model, [int(item) for item in args.clients.split(",")], args.max_tokens, images)
        print("\nthe engine alone (one process, no HTTP/Ray):\n| requests | mode | requests/s |\n|---|---|---|")
        for row in engine_rows:
            print(f"| {row['requests']} | {row['mode']} | {row['requests_per_s']:.2f} |")
    result = {"model": args.model or "tiny (built)", "max_tokens": args.max_tokens,
              "max_batch_size": args.max_batch_size, "machine": platform.platform(), "cpus_for_ray": args.num_cpus,
              "gpus_per_replica": args.gpus_per_replica, "rows": rows, "engine_rows": engine_rows,
              "caveat": "shared machine (other jobs running): compare modes within this run only"}
    write_atomically(args.json, lambda path: Path(path).write_text(json.dumps(result, indent=2)))
    print(f"wrote {args.json}")


def print_table(rows: list[dict]) -> None:
    print("\n| clients | mode | requests/s | p50 (ms) | p95 (ms) |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['clients']} | {row['mode']} | {row['requests_per_s']:.2f} | {row['p50_s'] * 1000:.0f} | "
              f"{row['p95_s'] * 1000:.0f} |")


if __name__ == "__main__":
    main()
