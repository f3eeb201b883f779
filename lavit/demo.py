"""`lavit demo`: LaVIT built end to end on this machine, offline, through the same code a user runs.

1. data: scikit-learn's handwritten digits (coloured, 64 px) with captions and question/answer pairs, plus the photos
   that ship with scikit-image and scikit-learn; a held-out split of digits is never trained on;
2. stage 1: a tiny visual tokenizer (`lavit train-tokenizer`'s function);
3. stage 2: a tiny LLaMA (trained BPE tokenizer, random weights) extended with the visual vocabulary and pretrained on
   image-text pairs in both orders (`lavit train`);
4. VQA fine-tuning (`lavit finetune --task vqa`);
5. a tiny pixel detokenizer (`lavit train-detokenizer`);
6. evaluation on the held-out digits, PNGs of kept patches, reconstructions and generated images, and a Hub-ready
   folder with a model card (`lavit export`).
"""

import statistics
import time
from pathlib import Path

import torch

from lavit.atomic import require_replaceable, write_json_recorded

DIGIT_QUESTION = "what digit is this?"
# min and max of each figure over full runs (not --quick): seeds 0, 1, 2 with one torch thread and seed 0 with two,
# printed beside this run's figures (docs/demo.md has the runs, benchmarks/results/demo_band_cpu.json their figures)
MEASURED_BAND = {"seeds": "0-2", "caption accuracy (stage 2)": (0.22, 0.35),
                 "text-to-image class accuracy": (0.31, 0.37), "VQA accuracy (fine-tuned)": (0.22, 0.35)}
FULL = {"tokenizer": 1500, "pretrain": 1500, "finetune": 600, "vae": 300, "detokenizer": 600, "train_digits": 1200,
        "eval": 100}
QUICK = {"tokenizer": 30, "pretrain": 30, "finetune": 20, "vae": 10, "detokenizer": 10, "train_digits": 200, "eval": 20}


def stage_arguments(output_dir: Path, steps: int, seed: int = 0, **overrides):
    """The demo's `TrainingArguments`: `steps` steps from `seed` (weights, data order, crops); the stages with a
    `small-data` preset take their learning rate, batch size and evaluation and checkpoint steps from it (a
    checkpoint at each evaluation: the one of the best held-out loss is the stage's model), the others from
    `overrides`."""
    from lavit.training.arguments import LaVITTrainingArguments

    return LaVITTrainingArguments(
        output_dir=str(output_dir), max_steps=steps, warmup_steps=0.05, logging_steps=max(1, steps // 10),
        use_cpu=not torch.cuda.is_available(), report_to="none", seed=seed,
        dataloader_num_workers=0, **overrides,
    )


def write_digit_data(folder: Path, count: int, offset: int, seed: int = 0) -> tuple[Path, list, list[int]]:
    from lavit.training.sample_data import DIGIT_NAMES, digit_caption, digit_images, write_imagefolder

    images, labels = digit_images(count, size=64, offset=offset, seed=seed)
    extra = [{"label": label, "question": DIGIT_QUESTION, "answer": DIGIT_NAMES[label]} for label in labels]
    write_imagefolder(folder, images, [digit_caption(label) for label in labels], extra)
    return folder, images, labels


def first_words(text: str) -> str:
    return " ".join(text.strip().split()[:4])


def evaluate(model, processor, images, labels) -> dict:
    """Caption and VQA accuracy (the class word in the output) and token statistics on held-out digits."""
    from tqdm.auto import tqdm

    from lavit.training.sample_data import DIGIT_NAMES

    model.eval()
    token_counts, caption_hits, answer_hits, examples = [], 0, 0, []
    for image, label in tqdm(list(zip(images, labels, strict=True)), desc="captions and answers", unit="digit"):
        caption_inputs = processor(images=[image], text="<image>", return_tensors="pt")
        caption_ids = model.generate(**caption_inputs, max_new_tokens=6, do_sample=False)
        caption = processor.batch_decode(caption_ids[:, caption_inputs["input_ids"].shape[1]:],
                                         skip_special_tokens=True)[0]
        question = processor(images=[image], text=f"<image>Question: {DIGIT_QUESTION} Answer:", return_tensors="pt")
        answer_ids = model.generate(**question, max_new_tokens=3, do_sample=False)
        answer = processor.batch_decode(answer_ids[:, question["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        caption_hits += DIGIT_NAMES[label] in caption.split()
        answer_hits += DIGIT_NAMES[label] in answer.split()
        tokens = model.visual_tokenizer.tokenize(caption_inputs["pixel_values"])
        token_counts.append(int(tokens.token_counts[0]))
        if len(examples) < 5:
            examples.append((DIGIT_NAMES[label], first_words(caption), first_words(answer)))
    return {
        "caption_accuracy": caption_hits / len(labels), "vqa_accuracy": answer_hits / len(labels),
        "tokens_mean": statistics.mean(token_counts), "tokens_min": min(token_counts),
        "tokens_max": max(token_counts), "examples": examples, "count": len(labels),
    }


def text_to_image_accuracy(model, processor, images, labels, per_class: int = 10, seed: int = 0) -> float:
    """Text-to-image on digits: codes generated for "the digit N" are decoded to encoder features by the visual
    tokenizer's decoder; a hit is a generated image whose features are nearest (cosine, after removing the mean) to
    the mean decoded features of real digits N (`images`, `labels`); the selection and sampling draw from `seed`."""
    from lavit.training.sample_data import digit_caption

    visual_tokenizer = model.visual_tokenizer
    pixel_values = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    real = visual_tokenizer.tokenize(pixel_values, generator=torch.Generator().manual_seed(seed))
    real_features = visual_tokenizer.decode_codes(real.code_ids, real.token_counts)
    mean = real_features.mean(dim=0, keepdim=True)
    labels = torch.tensor(labels)
    centroids = torch.stack([(real_features - mean)[labels == digit].mean(dim=0).flatten() for digit in range(10)])
    prompts = processor(text=[digit_caption(digit) for digit in range(10)], return_tensors="pt", padding=True)
    generated = model.generate_image_tokens(**prompts, guidance_scale=3.0, num_images_per_prompt=per_class,
                                            generator=torch.Generator().manual_seed(seed))
    generated_features = (visual_tokenizer.decode_codes(generated.code_ids, generated.token_counts) - mean).flatten(1)
    similarity = torch.nn.functional.normalize(generated_features, dim=-1) @ torch.nn.functional.normalize(
        centroids, dim=-1).T
    return float((similarity.argmax(dim=1) == torch.arange(10).repeat_interleave(per_class)).float().mean())


def generate_digit_images(pipe, image_dir: Path, written: list, names=("three", "seven"), seed: int = 0) -> str:
    """Text-to-image for two prompts with one seed (so only the prompt differs) through the `LaVITPipeline`, and a
    sentence saying whether the images, and the visual tokens behind them, differ between the prompts."""
    from lavit.atomic import save_png_atomically

    prompts = pipe.processor(text=[f"the digit {name}" for name in names], return_tensors="pt", padding=True)
    tokens = pipe.language_model.generate_image_tokens(**prompts, generator=torch.Generator().manual_seed(seed),
                                                       max_new_tokens=64)
    images = pipe.decode_visual_tokens(tokens, generator=torch.Generator().manual_seed(seed)).images
    for name, image in zip(names, images, strict=True):
        save_png_atomically(image, image_dir / f"generated_{name}.png")
        written.append(image_dir / f"generated_{name}.png")
    return describe_generated_images(names, tokens.per_image(), images)


DIFFERENT_IMAGES = 10.0  # mean absolute pixel difference (of 255) from which two images are called different


def describe_generated_images(names, token_ids: list, images: list) -> str:
    """Whether images generated for different prompts differ (mean absolute pixel difference of at least
    `DIFFERENT_IMAGES`/255, the measured value printed), and if not, which half of the model ignored the prompts."""
    import numpy as np

    first, second = names[0], names[1]
    difference = float(np.abs(np.asarray(images[0], dtype=np.float64) - np.asarray(images[1], dtype=np.float64))
                       .mean())
    measured = f"mean pixel difference {difference:.1f}/255, threshold {DIFFERENT_IMAGES:.0f}/255"
    if difference >= DIFFERENT_IMAGES:
        return (f"The images for {first!r} and {second!r} differ ({measured}; same seed: the prompt made the "
                f"difference).")
    if token_ids[0].tolist() == token_ids[1].tolist():
        return (f"Note: the images for {first!r} and {second!r} are nearly the same ({measured}): the LM generated the "
                f"same visual tokens for both prompts (it trained too briefly to tell them apart).")
    return (f"Note: the images for {first!r} and {second!r} are nearly the same ({measured}) although their visual "
            f"tokens differ: the pixel detokenizer trained too briefly to follow its tokens.")


def train_digit_models(train_folder: Path, runs: Path, steps: dict, seed: int = 0) -> tuple[Path, Path, Path]:
    """Stage 1, stage 2 (a tiny LLaMA with a BPE tokenizer trained on the captions and questions) and VQA
    fine-tuning on a digits imagefolder, all from `seed`; returns the tokenizer, pretrained and fine-tuned folders."""
    from lavit.training.finetune import FinetuningArguments, finetune
    from lavit.training.language_model import write_small_language_model
    from lavit.training.sample_data import DIGIT_NAMES, digit_caption
    from lavit.training.stage1_tokenizer import TokenizerTrainingArguments, train_tokenizer
    from lavit.training.stage2_pretrain import PretrainingArguments, pretrain

    # every stage: `--preset small-data` (docs/training.md, "Small data") with the demo's step counts
    print("[2/6] stage 1: visual tokenizer (the 'small' config: 64 px, 8 px patches, 256 codes)")
    # the 64 codes of the 'tiny' config are too few for the codes of a digit to tell its class
    tokenizer_folder = train_tokenizer(
        TokenizerTrainingArguments(data=str(train_folder), preset="small-data", resume="no"),
        stage_arguments(runs / "tokenizer", steps["tokenizer"], seed),
    )

    print("[3/6] stage 2: a tiny LLaMA learns text and visual tokens together")
    corpus = [digit_caption(label) for label in range(10)] + [
        f"Question: {DIGIT_QUESTION} Answer: {name}" for name in DIGIT_NAMES
    ]
    language_model = write_small_language_model(runs / "language_model", corpus, vocab_size=120, hidden_size=64,
                                                seed=seed)
    pretrained = pretrain(
        whole_digits(PretrainingArguments(data=str(train_folder), visual_tokenizer=str(tokenizer_folder),
                                          language_model=str(language_model), preset="small-data", resume="no")),
        stage_arguments(runs / "pretrain", steps["pretrain"], seed),
    )

    print("[4/6] fine-tuning: visual question answering")
    finetuned = finetune(
        whole_digits(FinetuningArguments(model=str(pretrained), data=str(train_folder), task="vqa",
                                         preset="small-data", resume="no")),
        stage_arguments(runs / "finetune", steps["finetune"], seed),
    )
    return tokenizer_folder, pretrained, finetuned


def whole_digits(arguments):
    """The preset's random crops and mirror images off, as a run that gives `--crop_scale 1 --horizontal_flip
    false`: a mirrored or half-cropped digit is another digit or none, and the LM also learns to draw them."""
    arguments.given_flags = frozenset({"crop_scale", "horizontal_flip"})
    return arguments


def run_demo(output: Path, quick: bool = False, seed: int = 0) -> dict:
    """Builds, evaluates and exports the tiny demo LaVIT in `output` (`quick`: a few steps per stage, to check the
    code paths; `seed`: every random draw, from the digits' colours to the weights and the sampled images); prints its
    progress and a summary and returns (and writes to `demo_results.json`) the results."""
    from lavit.atomic import save_png_atomically
    from lavit.hub_cards import export_loaded
    from lavit.processing.image_processing_lavit import draw_kept_patches
    from lavit.training.sample_data import DIGIT_NAMES

    steps = QUICK if quick else FULL
    output = Path(output)
    require_replaceable(output / "hub_folder")  # a folder of the user's there is refused now, not at the end
    started = time.perf_counter()
    # 1. data: training and held-out digits
    train_folder, train_images, train_labels, eval_images, eval_labels = write_demo_data(output, steps, seed)
    runs = output / "runs"
    # 2.-4. visual tokenizer, unified pretraining, VQA fine-tuning
    tokenizer_folder, pretrained, finetuned = train_digit_models(train_folder, runs, steps, seed)
    # 5. pixel detokenizer
    detokenizer_folder = train_demo_detokenizer(train_folder, tokenizer_folder, finetuned, runs, steps, seed)
    # 6. evaluation on the held-out digits, then the images
    print(f"[6/6] evaluation on {steps['eval']} held-out digits, images, Hub folder")
    pipe, stage2, drawing_accuracy, tuned = evaluate_demo_models(
        pretrained, finetuned, detokenizer_folder, (train_images, train_labels), (eval_images, eval_labels), seed)
    model, processor = pipe.language_model, pipe.processor

    image_dir = output / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    written = []
    grid = model.config.tokenizer_config.image_size // model.config.tokenizer_config.patch_size
    for index, (image, label) in enumerate(zip(eval_images[:3], eval_labels[:3], strict=True)):
        path = image_dir / f"kept_patches_{index}_{DIGIT_NAMES[label]}.png"
        image = image.resize((256, 256))
        keep_mask = model.visual_tokenizer.tokenize(processor.image_processor(image)["pixel_values"]).keep_mask[0]
        save_png_atomically(draw_kept_patches(image, keep_mask, grid), path)
        written.append(path)
    reconstructions = pipe.reconstruct(eval_images[:3], generator=torch.Generator().manual_seed(seed)).images
    for index, image in enumerate(reconstructions):
        save_png_atomically(image, image_dir / f"reconstruction_{index}.png")
        written.append(image_dir / f"reconstruction_{index}.png")
    generated_note = generate_digit_images(pipe, image_dir, written, seed=seed)

    # 7. the Hub folder with its model card, the printout and demo_results.json
    seconds = time.perf_counter() - started
    evaluation = evaluation_rows(stage2, drawing_accuracy, tuned)
    hub_folder = export_loaded(model, processor, output / "hub_folder", card_metadata(steps, tuned, evaluation),
                               pipeline=pipe)
    print_summary(evaluation, tuned, written, hub_folder, generated_note, seconds, band=not quick)
    results = {"seed": seed, "stage2": stage2, "text_to_image_accuracy": drawing_accuracy, "finetuned": tuned,
               "seconds": seconds, "hub_folder": str(hub_folder), "images": [str(path) for path in written]}
    write_json_recorded(output / "demo_results.json", results)
    return results


def write_demo_data(output: Path, steps: dict, seed: int = 0) -> tuple[Path, list, list[int], list, list[int]]:
    """Step 1: the training and held-out digit imagefolders (colours drawn from `seed`); returns the training folder
    and both splits' images and labels."""
    from lavit.training.sample_data import photo_images

    print(f"[1/6] data: {steps['train_digits']} training digits, {steps['eval']} held-out digits, "
          f"{len(photo_images())} photos (offline) -> {output / 'data'}")
    train_folder, train_images, train_labels = write_digit_data(output / "data" / "digits_train",
                                                                steps["train_digits"], offset=0, seed=seed)
    _, eval_images, eval_labels = write_digit_data(output / "data" / "digits_eval", steps["eval"],
                                                   offset=1797 - steps["eval"], seed=seed)
    return train_folder, train_images, train_labels, eval_images, eval_labels


def train_demo_detokenizer(train_folder: Path, tokenizer_folder: Path, finetuned: Path, runs: Path,
                           steps: dict, seed: int = 0) -> Path:
    """Step 5: a tiny pixel detokenizer on the training digits; returns its folder, a `LaVITPipeline`'s whose language
    model is the fine-tuned one."""
    from lavit.training.stage3_detokenizer import DetokenizerTrainingArguments, train_detokenizer

    print("[5/6] pixel detokenizer: a tiny latent diffusion model conditioned on the tokens")
    return train_detokenizer(
        DetokenizerTrainingArguments(data=str(train_folder), visual_tokenizer=str(tokenizer_folder),
                                     detokenizer_config="tiny", model=str(finetuned), ema_decay=0.99,
                                     vae_steps=steps["vae"], resume="no"),
        stage_arguments(runs / "detokenizer", steps["detokenizer"], seed, per_device_train_batch_size=16,
                        learning_rate=1e-3, save_steps=max(steps["detokenizer"], 1)),
    )


def evaluate_demo_models(pretrained: Path, finetuned: Path, detokenizer_folder: Path, train_data: tuple,
                         eval_data: tuple, seed: int = 0) -> tuple:
    """Step 6 (metrics): the `LaVITPipeline` of the fine-tuned model (with its processor and the trained pixel
    decoder), and the stage-2 metrics, the stage-2 text-to-image accuracy and the fine-tuned metrics on the held-out
    digits (`evaluate`)."""
    from lavit import LaVITForCausalLM, LaVITPipeline

    pipe = LaVITPipeline.from_pretrained(detokenizer_folder)  # stage 3 saved it with the fine-tuned language model
    model, processor = pipe.language_model, pipe.processor
    pipe.set_progress_bar_config(desc="denoising")
    pretrained_model = LaVITForCausalLM.from_pretrained(pretrained).eval()
    stage2 = evaluate(pretrained_model, processor, *eval_data)
    drawing_accuracy = text_to_image_accuracy(pretrained_model, processor, *train_data, seed=seed)
    tuned = evaluate(model, processor, *eval_data)
    return pipe, stage2, drawing_accuracy, tuned


def evaluation_rows(stage2: dict, drawing_accuracy: float, tuned: dict) -> list[dict]:
    """The metrics table of the printout and the model card: metric, value and the data it was measured on."""
    return [
        {"metric": "caption accuracy (stage 2)", "value": f"{stage2['caption_accuracy']:.2f}",
         "data": f"{stage2['count']} held-out digits, chance 0.10"},
        {"metric": "text-to-image class accuracy", "value": f"{drawing_accuracy:.2f}",
         "data": "100 generated images, nearest class of their decoded features, chance 0.10"},
        {"metric": "VQA accuracy (fine-tuned)", "value": f"{tuned['vqa_accuracy']:.2f}",
         "data": f"{tuned['count']} held-out digits, chance 0.10"},
        {"metric": "visual tokens per image", "value": f"{tuned['tokens_mean']:.1f} (min {tuned['tokens_min']}, "
                                                       f"max {tuned['tokens_max']})", "data": "of 64 patches"},
    ]


def card_metadata(steps: dict, tuned: dict, evaluation: list[dict]) -> dict:
    """The model card fields of the demo's Hub folder (`lavit.hub_cards.export_loaded`)."""
    return {
        "model_name": "LaVIT tiny demo",
        "summary": "A tiny LaVIT built by `lavit demo` on a CPU in minutes: it shows the code paths, not the "
                   "capabilities of the paper's 7B model.",
        "training_data": f"{steps['train_digits']} coloured 64 px digits from scikit-learn's `load_digits` with "
                         f"captions (\"the digit five\") and question/answer pairs; held-out digits for evaluation.",
        "training_stages": [
            {"name": "stage 1, visual tokenizer", "description": f"{steps['tokenizer']} steps, tiny preset"},
            {"name": "stage 2, unified pretraining", "description": f"{steps['pretrain']} steps on image-text pairs "
                                                                     f"in both orders, tiny random LLaMA"},
            {"name": "VQA fine-tuning", "description": f"{steps['finetune']} steps"},
            {"name": "pixel detokenizer", "description": f"a tiny VAE fitted for {steps['vae']} steps, then "
                                                         f"{steps['detokenizer']} diffusion steps, EMA weights"},
        ],
        "token_statistics": f"{tuned['tokens_mean']:.1f} visual tokens per held-out digit on average "
                            f"(min {tuned['tokens_min']}, max {tuned['tokens_max']}, of 64 patches).",
        "evaluation": evaluation,
        "limitations": "A demonstration model: random frozen vision encoder, a 2-layer LM and minutes of CPU "
                       "training. It only knows ten digit captions and one question, and its images are blurs; do not "
                       "use it for anything but checking the code paths.",
    }


def print_summary(evaluation: list[dict], tuned: dict, written: list, hub_folder: Path, generated_note: str,
                  seconds: float, band: bool = False) -> None:
    """The closing printout: the metrics table (with the `MEASURED_BAND` of full runs when `band`), a few answers,
    the files written, and what the model can do."""
    print()
    print(f"{'metric':34} {'value':>22} {'band' if band else '':>10}   data")
    for row in evaluation:
        low_high = MEASURED_BAND.get(row["metric"]) if band else None
        measured = f"{low_high[0]:.2f}-{low_high[1]:.2f}" if low_high else ""
        print(f"{row['metric']:34} {row['value']:>22} {measured:>10}   {row['data']}")
    if band:
        print(f"band: the lowest and highest value of full runs with seeds {MEASURED_BAND['seeds']} (docs/demo.md)")
    print("\nexamples (truth -> caption | answer):")
    for truth, caption, answer in tuned["examples"]:
        print(f"  {truth:6} -> {caption!r} | {answer!r}")
    print("\nwritten:")
    for path in written:
        print(f"  {path}")
    print(f"  {hub_folder}  (DiffusionPipeline.from_pretrained(folder, trust_remote_code=True); the LM: "
          f"AutoModelForCausalLM.from_pretrained('{hub_folder / 'language_model'}', trust_remote_code=True))")
    print(f"\n{generated_note}")
    print(f"\ndone in {seconds / 60:.1f} min.")
    accuracy = tuned["vqa_accuracy"]
    seen = (f"and tell some digits apart from their tokens: {accuracy:.0%} of its answers on unseen digits are "
            f"right, against 10% by chance" if accuracy > 0.15 else
            f"but this run's answers on unseen digits ({accuracy:.0%} right) are at chance (10%): it trained too "
            f"briefly to see")
    print(f"What this tiny model can do: run every stage of LaVIT (images -> a variable number of discrete tokens, "
          f"one LM that reads and writes them, captions, answers, images, a Hub folder), {seen}. What it cannot do: "
          f"describe images in general, follow other prompts, or draw recognisable digits. Its vision encoder is "
          f"random, its LM has two layers, and everything trained for minutes on a CPU; real quality needs the "
          f"released LaVIT weights (`lavit convert-original`) or training at scale.")
