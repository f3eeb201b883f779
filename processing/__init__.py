"""LaVIT preprocessing and pipelines. The files in this folder are copied flat into Hub model folders (remote code),
so they only import each other as `from .module import X`.

The namespace is lazy: a class is imported on first use (`from lavit.modeling import LaVITForCausalLM`), which also
registers lavit's classes with the transformers Auto classes (`lavit.registration`). This file is never copied into a
Hub folder (those hold the modules and what they import, `saving_lavit.code_files`), so it may import `lavit`.
"""

from lavit.registration import lazy_namespace

_CLASSES = {
    ".image_processing_lavit": ("LaVITImageProcessor",),
    ".pipelines_lavit": ("LaVITTextToImagePipeline",),
    ".processing_lavit": ("LaVITProcessor",),
}
__getattr__, __dir__ = lazy_namespace(globals(), _CLASSES)

__all__ = [
    "LaVITImageProcessor",
    "LaVITProcessor",
    "LaVITTextToImagePipeline",
]
