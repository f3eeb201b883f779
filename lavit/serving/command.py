"""`lavit serve MODEL`: the parser and runner the `lavit` command adds (Ray is imported only when it runs)."""

import argparse
from pathlib import Path

from lavit.command_inputs import require_folder
from lavit.modeling.validation_lavit import NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, POSITIVE_INT, Range
from lavit.paths import InputPath

PORT = Range(1, 65535, integer=True)


def make_parser(commands) -> argparse.ArgumentParser:
    serve = commands.add_parser("serve", help="an OpenAI-compatible server on Ray Serve (chat, images, batching)")
    serve.add_argument("model", type=InputPath, help="a LaVIT folder or Hub id")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=PORT, default=8000, help="HTTP port")
    serve.add_argument("--served-model-name", default=None, help="the `model` clients send (default: folder name)")
    serve.add_argument("--replicas", type=POSITIVE_INT, default=1,
                       help="model replicas (the least, with --max-replicas)")
    serve.add_argument("--max-replicas", type=POSITIVE_INT, default=None,
                       help="autoscale between --replicas and this many replicas on ongoing requests")
    serve.add_argument("--target-ongoing-requests", type=POSITIVE_INT, default=16,
                       help="autoscaling aims at this many ongoing requests per replica")
    serve.add_argument("--gpus-per-replica", type=NON_NEGATIVE_FLOAT, default=None,
                       help="GPUs per model replica (default: 1 when this machine has a GPU, else 0: CPU)")
    serve.add_argument("--cpus-per-replica", type=POSITIVE_FLOAT, default=1.0, help="CPUs per model replica")
    serve.add_argument("--num-cpus", type=POSITIVE_INT, default=None, help="CPUs the local Ray instance may use")
    serve.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="default: bfloat16 on GPUs, float32 on CPUs")
    serve.add_argument("--max-batch-size", type=POSITIVE_INT, default=16,
                       help="requests batched together (1: one at a time)")
    serve.add_argument("--max-image-batch-size", type=POSITIVE_INT, default=4,
                       help="image requests drawn in one pipeline call (same size and settings)")
    serve.add_argument("--batch-wait-timeout", type=NON_NEGATIVE_FLOAT, default=0.02,
                       help="seconds to wait to fill a batch")
    serve.add_argument("--allowed-local-media-path", type=InputPath, default=None,
                       help="the one folder whose files requests may name as image_url (default: none, data URLs only)")
    serve.add_argument("--max-tokens", type=POSITIVE_INT, default=None,
                       help="the most max_tokens a request may ask (1024)")
    serve.add_argument("--max-n", type=POSITIVE_INT, default=None, help="the most choices a request may ask (8)")
    serve.add_argument("--max-images", type=POSITIVE_INT, default=None, help="the most images per request (8)")
    serve.add_argument("--request-timeout", type=POSITIVE_FLOAT, default=600.0,
                       help="seconds after which a request still running is cancelled and gets a 408")
    return serve


def run(args) -> None:
    # a run's folder, a stopped save, an adapter or another kind of model: one line with the fix, before Ray starts
    require_folder(args.model, ("lavit",), flag="", adapters=False)
    import torch

    from .deployments import ServeSettings, run_server
    from .engine import RequestPreparer
    from .schemas import ServeLimits

    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model  # replicas run elsewhere
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else float(torch.cuda.is_available())
    limits = {name: value for name, value in (("max_tokens", args.max_tokens), ("max_n", args.max_n),
                                              ("max_images_per_request", args.max_images)) if value is not None}
    # the folder, its processor and the limits are checked here, before Ray starts: a bad one is one line
    RequestPreparer(model, ServeLimits(**limits), args.allowed_local_media_path)
    settings = ServeSettings(
        model=model, model_name=args.served_model_name, replicas=args.replicas, max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests, request_timeout_s=args.request_timeout,
        gpus_per_replica=gpus, cpus_per_replica=args.cpus_per_replica, dtype=args.dtype,
        max_batch_size=args.max_batch_size, max_image_batch_size=args.max_image_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout,
        allowed_local_media_path=args.allowed_local_media_path, limits=limits,
    )
    run_server(settings, host=args.host, port=args.port, num_cpus=args.num_cpus)
