"""`lavit evaluate BENCHMARK`: zero-shot evaluation on the paper's benchmarks or your own data (`lavit.evaluation`)."""

import json
import sys
from pathlib import Path

from lavit.command_inputs import CommandError, load_lavit_model, require_folder
from lavit.modeling.validation_lavit import POSITIVE_INT, SEED, floating_dtype
from lavit.paths import InputPath, OutputPath

from .common import add_command, load_pipeline


def add_parsers(commands) -> None:
    from lavit.evaluation.benchmarks import BENCHMARKS
    from lavit.evaluation.data import FORMATS
    from lavit.evaluation.runner import EvalConfig

    evaluate = add_command(commands, "evaluate", "zero-shot evaluation on a benchmark (resumable, data-parallel)")
    evaluate.add_argument("benchmark", choices=sorted(BENCHMARKS), help="a paper benchmark, or caption|vqa|"
                          "text-to-image with --format")
    evaluate.add_argument("--model", type=InputPath, required=True, help="a LaVIT folder or Hub id")
    evaluate.add_argument("--output", type=OutputPath, required=True,
                          help="folder for predictions-*.jsonl, images/ and results.json")
    evaluate.add_argument("--format", choices=FORMATS, default=None, help="annotation format (default: the "
                          "benchmark's)")
    evaluate.add_argument("--annotations", type=InputPath, default=None,
                          help="annotation JSON (captions, answers or questions)")
    evaluate.add_argument("--questions", type=InputPath, default=None, help="VQAv2/OK-VQA questions JSON")
    evaluate.add_argument("--images", type=InputPath, default=None,
                          help="image folder (paths in the annotations are relative to it)")
    evaluate.add_argument("--image-pattern", default=None, help="VQAv2 image file name, e.g. "
                          "'COCO_val2014_{image_id:012d}.jpg'")
    evaluate.add_argument("--dataset", type=InputPath, default=None,
                          help="a datasets Hub id or folder (--format datasets)")
    evaluate.add_argument("--columns", default=None, help="role=column pairs: id, image, question, answers, "
                          "captions, text")
    evaluate.add_argument("--split", default=None, help="Karpathy split or datasets split (default: the benchmark's)")
    evaluate.add_argument("--limit", type=POSITIVE_INT, default=None, help="only the first N samples (default: all)")
    evaluate.add_argument("--batch-size", type=EvalConfig.field_ranges["batch_size"], default=8,
                          help="samples per generate call")
    evaluate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                          help="weights' dtype (default: the folder's)")
    evaluate.add_argument("--prompt", default="", help="caption: text after the image (default and official: empty)")
    evaluate.add_argument("--num-beams", type=POSITIVE_INT, default=None,
                          help="beam search width (default: the benchmark's official setting)")
    evaluate.add_argument("--max-new-tokens", type=POSITIVE_INT, default=None,
                          help="the longest answer or caption (default: the benchmark's official setting)")
    evaluate.add_argument("--steps", type=POSITIVE_INT, default=None,
                          help="text-to-image decoder steps (default: the official 50)")
    evaluate.add_argument("--seed", type=SEED, default=0,
                          help="seed of text-to-image sampling and of a sampling visual tokenizer's selection")
    evaluate.add_argument("--num-candidates", type=EvalConfig.field_ranges["num_candidates"], default=1,
                          help="text-to-image: images per caption, the closest to it under --clip-model kept "
                          "(official 4)")
    evaluate.add_argument("--fid-features", type=InputPath, default=None,
                          help="vision model (path/Hub id) for FID features "
                               "(default: torchmetrics' Inception, needs torch-fidelity)")
    evaluate.add_argument("--clip-model", type=InputPath, default=None, help="CLIP model (path/Hub id) for CLIP score")
    evaluate.add_argument("--no-java", action="store_true", help="skip the Java tools (PTB tokenizer, METEOR, SPICE)")
    evaluate.add_argument("--allow-unmatched", action="store_true", help="drop (and count) captions of no image "
                          "and answers of no question instead of stopping")
    evaluate.add_argument("--record", action="store_true", help="add the scores to MODEL/lavit_run.json for the "
                          "model card (`lavit export`)")
    evaluate.add_argument("--json", action="store_true", help="print the results (failed samples included) as JSON")


def evaluation_config(args, task_benchmark):
    from lavit.evaluation import EvalConfig

    overrides = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens}
    if task_benchmark.task == "text-to-image":
        overrides = {"num_inference_steps": args.steps}
    return EvalConfig(
        task=task_benchmark.task, generation={key: value for key, value in overrides.items() if value is not None},
        prompt=args.prompt, vqa_metric=task_benchmark.vqa_metric, vizwiz_two_stage=task_benchmark.vizwiz_two_stage,
        batch_size=args.batch_size, seed=args.seed, num_candidates=args.num_candidates,
        fid_features=args.fid_features, clip_model=args.clip_model, use_java=False if args.no_java else None,
        name=task_benchmark.name, dataset_type=task_benchmark.dataset_type, split=args.split or task_benchmark.split,
    )


def run_evaluate(args) -> None:

    from lavit.command_inputs import report_failed_samples
    from lavit.evaluation import BENCHMARKS, evaluate, load_samples, record_results
    from lavit.evaluation.runner import distributed_state

    benchmark = BENCHMARKS[args.benchmark]
    data_format = args.format or benchmark.format
    if data_format is None:
        raise CommandError(f"benchmark {args.benchmark!r} needs --format")
    if args.record and not Path(args.model).is_dir():
        raise CommandError(f"--record writes into the model folder, but {args.model} is not a local folder")
    config = evaluation_config(args, benchmark)
    samples = load_samples(data_format, args.annotations, args.questions, args.images, config.split, args.dataset,
                           args.columns, args.image_pattern, args.allow_unmatched)[: args.limit]
    require_folder(args.model)
    dtype = {} if args.dtype is None else {"dtype": floating_dtype(args.dtype, "--dtype")}
    if config.task == "text-to-image":  # images come from the LaVITPipeline, whose processor it holds
        model = load_pipeline(args.model).to(distributed_state().device, **dtype)
        processor = model.processor
    else:  # a model folder, Hub id or PEFT adapter folder
        model, processor = load_lavit_model(args.model, **dtype)
        model = model.to(distributed_state().device)
    results = evaluate(model, processor, samples, config, args.output)
    if results is None:  # not the main process
        return
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    for name, value in ({} if args.json else results["metrics"]).items():
        print(f"{name}: {value:.2f}")
    for name, reason in ({} if args.json else results["unavailable"]).items():
        print(f"{name}: not computed ({reason})")
    print(Path(args.output) / "results.json", file=sys.stderr if args.json else sys.stdout)
    report_failed_samples(results, args.record)  # each bad sample on its own line; exit 1 if any
    if args.record:
        print(record_results(args.model, results))


RUNNERS = {"evaluate": run_evaluate}
