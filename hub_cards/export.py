"""Hub-ready LaVIT folders: code, configs, safetensors shards, processor, pixel decoder and a model card rendered from
the run's own metadata; and their upload with `huggingface_hub`.

The metadata of a run is a JSON file `lavit_run.json` in the model folder (the demo and `lavit export --metadata`
write it). Every key is optional: `model_name`, `summary`, `intended_uses`, `training_data`, `datasets` (list),
`base_model`, `license`, `training_stages` (list of `{name, description}`), `token_statistics`, `evaluation` (list
of `{metric, value, data}`; rows written by `lavit evaluate --record` also carry `task_type`, `dataset_type`,
`dataset_name`, `dataset_split` and `metric_type` and become the card's `model-index`), `limitations`.
"""

import json
from pathlib import Path

import lavit.modeling
import lavit.processing
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from lavit.modeling import LaVITForCausalLM
from lavit.modeling.folders_lavit import is_lavit_pipeline_folder, language_model_folders
from lavit.modeling.generation_lavit import PIPELINE_FILE
from lavit.modeling.pipeline_lavit import CUSTOM_COMPONENT_MODULES, PIPELINE_MODULE
from lavit.modeling.saving_lavit import code_files, loads_json
from lavit.modeling.transformers_compat import transformers_requirement
from lavit.processing import LaVITProcessor

from lavit.atomic import (
    MARKER_FILE,
    fresh_staging_folder,
    replace_folder,
    require_replaceable,
    write_json_atomically,
)
from lavit.file_kinds import SAFETENSORS_WEIGHTS, folder_problems, require_safetensors_weights
from lavit.paths import check_destination

TEMPLATE = Path(__file__).parent / "templates" / "lavit_model_card.md"
METADATA_FILE = "lavit_run.json"


def module_code(*module_names: str) -> tuple[str, ...]:
    """The code files a folder holding the modules `module_names` (of `modeling_lavit/` or `processing/`) needs:
    the modules and what they import, as `saving_lavit.code_files` finds them (the one owner of that answer)."""
    folders = (Path(lavit.modeling.__file__).parent, Path(lavit.processing.__file__).parent)
    paths = [next(folder / f"{name}.py" for folder in folders if (folder / f"{name}.py").is_file())
             for name in module_names]
    return tuple(path.name for path in code_files(*paths))


# the language model's folder also holds the transformers pipeline (`LaVITFolderMixin` copies it: no model imports it)
LANGUAGE_MODEL_CODE = module_code(CUSTOM_COMPONENT_MODULES["language_model"], Path(PIPELINE_FILE).stem)
PROCESSOR_CODE = module_code(CUSTOM_COMPONENT_MODULES["processor"])
# a LaVIT model folder: the model and its processor, saved into one folder
REQUIRED_FILES = ("config.json", "processor_config.json", "README.md",
                  *sorted(set(LANGUAGE_MODEL_CODE + PROCESSOR_CODE)))
# a `LaVITPipeline` Hub folder: its own files, and the sub-folders with the files each needs
PIPELINE_ROOT_FILES = ("README.md", *module_code(PIPELINE_MODULE))
PIPELINE_FOLDERS = {
    "language_model": ("config.json", *LANGUAGE_MODEL_CODE),
    "processor": ("processor_config.json", *PROCESSOR_CODE),
    "condition_encoder": ("config.json", *module_code(CUSTOM_COMPONENT_MODULES["condition_encoder"])),
    "unet": ("config.json",), "vae": ("config.json",), "scheduler": ("scheduler_config.json",),
}
NOT_RECORDED = "Not recorded for this model."
DEFAULT_INTENDED_USES = (
    "Research on unified vision-language models: image captioning, visual question answering, multimodal chat, "
    "text-to-image and image+text-to-image generation through discrete visual tokens, and fine-tuning on such tasks. "
    "Not for decisions about people, and not evaluated for safety."
)
DEFAULT_LIMITATIONS = (
    "The model inherits the biases of its language model, vision encoder and training data. Visual tokens keep the "
    "semantics of an image better than its exact layout, text or fine detail, so reconstructions and generations "
    "differ from the source in detail. Generated images are not filtered by a safety checker."
)


def read_metadata(folder) -> dict:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        return loads_json(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _parameters(module) -> str:
    count = sum(parameter.numel() for parameter in module.parameters())
    return f"{count / 1e9:.2f}B parameters" if count >= 1e8 else f"{count / 1e6:.2f}M parameters"


def eval_results(rows: list[dict]) -> list[EvalResult] | None:
    """The evaluation rows that name their task and dataset -> `model-index` entries (the Hub shows them)."""
    results = [
        EvalResult(task_type=row["task_type"], dataset_type=row["dataset_type"], dataset_name=row["dataset_name"],
                   dataset_split=row.get("dataset_split"), metric_type=row["metric_type"], metric_name=row["metric"],
                   metric_value=row["value"])
        for row in rows if all(key in row for key in ("task_type", "dataset_type", "dataset_name", "metric_type"))
    ]
    return results or None


def model_card(model: LaVITForCausalLM, metadata: dict, repo_id: str = "path/to/this/folder",
               pipeline=None) -> ModelCard:
    """Renders the model card of `model` (the `language_model` of `pipeline` for a `LaVITPipeline` folder) from the
    run's metadata (see the module docstring)."""
    config = model.config
    visual_tokenizer = model.visual_tokenizer
    components = {
        "language model": f"{config.text_config.model_type}, {_parameters(model.model.language_model)}",
        "frozen vision encoder": f"{visual_tokenizer.config.vision_config.model_type}, "
                                 f"{_parameters(visual_tokenizer.vision_model)}, {visual_tokenizer.config.image_size} "
                                 f"px, {visual_tokenizer.config.num_patches} patches",
        "visual tokenizer (selector, merger, quantizer, decoder)": _parameters(visual_tokenizer) + " in all",
        "LM-side merger and projection": _parameters(model.model.visual_merger),
    }
    if pipeline is not None:
        condition_encoder = pipeline.condition_encoder
        components["pixel decoder (LaVITPipeline: condition_encoder/, unet/, vae/, scheduler/)"] = (
            f"{condition_encoder.config.conditioning} conditioning, UNet {_parameters(pipeline.unet)}, "
            f"{condition_encoder.config.image_size} px, {type(pipeline.scheduler).__name__}"
        )
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=metadata.get("license", "apache-2.0"),
        tags=["lavit", "multimodal", "text-to-image", "visual-tokenizer", "custom_code"],
        datasets=metadata.get("datasets"),
        base_model=metadata.get("base_model"),
        model_name=metadata.get("model_name", "LaVIT"),
        eval_results=eval_results(metadata.get("evaluation", [])),
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=metadata.get("model_name", "LaVIT"),
        summary=metadata.get("summary", "A LaVIT model (dynamic discrete visual tokens + one causal LM)."),
        components=components,
        text_vocab_size=config.text_vocab_size,
        codebook_size=config.tokenizer_config.codebook_size,
        intended_uses=metadata.get("intended_uses", DEFAULT_INTENDED_USES),
        repo_id=repo_id,
        has_detokenizer=pipeline is not None,
        training_data=metadata.get("training_data", NOT_RECORDED),
        training_stages=metadata.get("training_stages", [{"name": "training", "description": NOT_RECORDED}]),
        token_statistics=metadata.get("token_statistics", NOT_RECORDED),
        evaluation=metadata.get("evaluation", []),
        limitations=metadata.get("limitations", DEFAULT_LIMITATIONS),
        transformers_requirement=transformers_requirement(),
    )


def export_model(source, output_dir, metadata: dict | None = None, repo_id: str | None = None,
                 max_shard_size: str = "5GB") -> Path:
    """
    Writes the Hub folder of the LaVIT model or `LaVITPipeline` folder `source` to `output_dir` (see
    [`export_loaded`]); the source's `lavit_run.json` is updated by `metadata`. A pipeline's `language_model/`
    sub-folder exports its language model with the pipeline's processor (`language_model_folders`).
    """
    source, output_dir = Path(source), Path(output_dir)
    is_pipeline = is_lavit_pipeline_folder(source) or (source / "detokenizer" / "config.json").is_file()
    if not is_pipeline and not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a model folder (no config.json)")
    check_destination(output_dir, {"source": source}, name="the export folder")
    require_replaceable(output_dir)  # before the model is loaded
    require_safetensors_weights(source)
    metadata = {**read_metadata(source), **(metadata or {})}
    if is_pipeline:  # a LaVITPipeline folder, or a folder of lavit <= 0.x with its decoder in detokenizer/
        from lavit import LaVITPipeline

        pipe = LaVITPipeline.from_pretrained(source)
        if pipe.language_model is None:  # the decoder alone (stage 3 without --model): a card needs the model
            raise ValueError(f"{source} is a pixel decoder without a language model: save it with one first "
                             f"(LaVITPipeline.from_pretrained(folder, language_model=..., processor=...)"
                             f".save_pretrained(new)), then export that folder")
        return export_loaded(pipe.language_model, pipe.processor, output_dir, metadata, repo_id, max_shard_size,
                             pipeline=pipe)
    # a model folder, or a pipeline's language_model/ (its processor is the pipeline's): the one resolver's answer
    model_folder, processor_folder = language_model_folders(source) or (source, source)
    model = LaVITForCausalLM.from_pretrained(model_folder)
    processor = LaVITProcessor.from_pretrained(processor_folder)
    return export_loaded(model, processor, output_dir, metadata, repo_id, max_shard_size)


def export_loaded(model: LaVITForCausalLM, processor: LaVITProcessor, output_dir, metadata: dict | None = None,
                  repo_id: str | None = None, max_shard_size: str = "5GB", pipeline=None) -> Path:
    """
    Writes a Hub folder: weights in safetensors shards of at most `max_shard_size`, code files and `auto_map`,
    processor, `lavit_run.json` (the metadata) and the rendered model card. With `pipeline` (a `LaVITPipeline` whose
    `language_model` is `model`) the folder is the pipeline's (`model_index.json`, one sub-folder per component), so
    it draws images with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`. The folder is written
    beside `output_dir` and renamed into place, so an interrupted export leaves no half folder.
    """
    output_dir = Path(output_dir)
    metadata = dict(metadata or {})
    staging = fresh_staging_folder(output_dir)
    if pipeline is not None:
        pipeline.save_pretrained(staging, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)
    write_json_atomically(staging / METADATA_FILE, metadata)
    card = model_card(model, metadata, repo_id or metadata.get("repo_id", str(output_dir)), pipeline)
    card.save(staging / "README.md")
    check_export_folder(staging)
    return replace_folder(staging, output_dir)  # the old folder stays whole until the new one replaces it at once


def check_export_folder(folder) -> None:
    """Raises a `ValueError` naming every problem of a Hub folder (a LaVIT model's, or a `LaVITPipeline`'s with
    `model_index.json`): missing files, missing weights, and any file that is not of a kind lavit publishes, checked
    by content (`lavit.file_kinds`: the allowlist), or links out of it."""
    folder = Path(folder)
    if is_lavit_pipeline_folder(folder):
        problems = missing_files(folder, PIPELINE_ROOT_FILES, weights=False)
        for name, required in PIPELINE_FOLDERS.items():
            problems += missing_files(folder, required, name, weights=name not in ("processor", "scheduler"))
    else:
        problems = missing_files(folder, REQUIRED_FILES)
    problems += folder_problems(folder)
    if problems:
        raise ValueError(f"{folder} is not a complete LaVIT Hub folder: " + "; ".join(problems))


def missing_files(folder: Path, required, subfolder: str = "", weights: bool = True) -> list[str]:
    """The `required` files and (with `weights`) the safetensors weights missing from `folder / subfolder`."""
    where = folder / subfolder
    prefix = f"{subfolder}/" if subfolder else ""
    problems = [f"missing {prefix}{name}" for name in required if not (where / name).is_file()]
    if not weights:
        return problems
    if not any((where / name).is_file() for name in SAFETENSORS_WEIGHTS):
        problems.append(f"missing weights ({prefix}model.safetensors or {prefix}model.safetensors.index.json)")
    for index in (where / name for name in SAFETENSORS_WEIGHTS if name.endswith(".index.json")):
        if index.is_file():
            shards = set(loads_json(index.read_text())["weight_map"].values())
            problems += [f"missing shard {prefix}{shard}" for shard in sorted(shards) if not (where / shard).is_file()]
    return problems


def push_to_hub(folder, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload LaVIT model") -> str:
    """Uploads an exported folder (checked first) to the Hub repo `repo_id`, creating it if needed; returns the
    commit URL."""
    check_export_folder(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    # lavit's own bookkeeping (in every folder a save wrote), not part of the model
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                               ignore_patterns=[MARKER_FILE, f"**/{MARKER_FILE}"])
    return str(commit)


__all__ = ["check_export_folder", "export_loaded", "export_model", "model_card", "push_to_hub", "read_metadata"]
