"""Zero-shot evaluation of LaVIT models on the paper's benchmarks (installed as `lavit.evaluation`; `lavit evaluate`
on the command line): readers of the standard annotation formats, the official prompts and generation settings,
resumable data-parallel generation, and the metrics: `evaluate` modules shipped in `metrics/` (pycocoevalcap, the
official VQA accuracy, torchmetrics FID and CLIP score; `metric_path(name)` for `evaluate.load`)."""

from .benchmarks import BENCHMARKS, Benchmark
from .data import FORMATS, EvalSample, load_samples, parse_columns
from .metrics import (
    METRIC_NAMES,
    caption_metrics,
    clip_score,
    fid_score,
    load_metric,
    metric_path,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_metrics,
)
from .runner import EvalConfig, evaluate, read_predictions, record_results, score

__all__ = ["BENCHMARKS", "FORMATS", "METRIC_NAMES", "Benchmark", "EvalConfig", "EvalSample", "caption_metrics",
           "clip_score", "evaluate", "fid_score", "load_metric", "load_samples", "metric_path", "normalize_vqa_answer",
           "parse_columns", "read_predictions", "record_results", "score", "vqa_accuracy", "vqa_metrics"]
