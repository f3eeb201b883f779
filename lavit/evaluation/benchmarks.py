"""The paper's benchmarks: task, annotation format, metric and the labels of their results (Hub dataset ids for the
model card's `model-index`). `caption`, `vqa` and `text-to-image` are the generic forms (any format)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    task: str
    format: str | None
    name: str
    dataset_type: str
    split: str | None = None
    vqa_metric: str = "vqa_accuracy"
    vizwiz_two_stage: bool = False


BENCHMARKS = {
    "coco-karpathy": Benchmark("caption", "karpathy", "COCO Karpathy test", "yerevann/coco-karpathy", "test"),
    "nocaps": Benchmark("caption", "coco", "NoCaps val", "HuggingFaceM4/NoCaps", "validation"),
    "flickr30k": Benchmark("caption", "karpathy", "Flickr30k test", "nlphuji/flickr30k", "test"),
    "vqav2": Benchmark("vqa", "vqav2", "VQAv2 val", "HuggingFaceM4/VQAv2", "validation"),
    "okvqa": Benchmark("vqa", "vqav2", "OK-VQA val", "HuggingFaceM4/OK-VQA", "validation"),
    "gqa": Benchmark("vqa", "gqa", "GQA testdev-balanced", "lmms-lab/GQA", "testdev", vqa_metric="exact_match"),
    "vizwiz": Benchmark("vqa", "vizwiz", "VizWiz val", "lmms-lab/VizWiz-VQA", "validation", vizwiz_two_stage=True),
    "coco-t2i": Benchmark("text-to-image", "karpathy", "MS-COCO text-to-image", "coco", "val"),  # Karpathy split name
    "caption": Benchmark("caption", None, "custom captioning", "custom"),
    "vqa": Benchmark("vqa", None, "custom VQA", "custom"),
    "text-to-image": Benchmark("text-to-image", None, "custom text-to-image", "custom"),
}

__all__ = ["BENCHMARKS", "Benchmark"]
