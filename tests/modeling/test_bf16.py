"""bfloat16 on every path, on this CPU (bf16 matmul, SDPA and CPU autocast run natively with avx512_bf16; elsewhere
torch emulates them, slower but with the same results).

Two ways to run in bf16, as users do: weights loaded with `from_pretrained(..., dtype=torch.bfloat16)`, and float32
weights under `torch.autocast("cpu", dtype=torch.bfloat16)` (what the Trainer does with `--bf16`). Each test checks
the output dtypes, that no activation-sized float32 tensor appears in a bf16 forward (a silent upcast), and agreement
with float32 within a bf16 tolerance. What is compared:
  - continuous outputs (features, decoded features, logits, images): relative l2 error (|x - ref| / |ref|) < 3e-2
    (bf16 keeps 8 bits of mantissa, 4e-3 per rounding; a few layers accumulate ~1e-2);
  - losses: relative difference < 2e-2;
  - discrete outputs (code ids, greedy tokens): equal wherever float32's margin between the best and the second
    choice is larger than what bf16 rounding can move: MARGIN for code cosines, MARGIN_FRACTION of the step's score
    spread (std) for LM scores (a random tiny LM has logits of ~0.1, so an absolute margin would say nothing); a
    near-tie may flip, and after a flip the two sequences continue from different prefixes, so sequences are compared
    up to their first near-tie.
"""

import pytest
import torch
from conftest import (
    photo_batch,
    real_photos,
    text_vocab_size,
    tiny_detokenizer_config,
    tiny_lavit_config,
    tiny_tokenizer_config,
)
from torch.utils._python_dispatch import TorchDispatchMode

from lavit import LaVITDetokenizer, LaVITForCausalLM, LaVITTokenizerModel

BF16 = torch.bfloat16
RELATIVE = 3e-2
MARGIN = 0.05
# bf16 moves a guided image-token score by at most ~0.025 of the step's score std (measured on these models), so two
# candidates swap only within 0.05 std: 0.15 leaves a factor of 3
MARGIN_FRACTION = 0.15
# bf16 moved the mean log-probability of a beam by at most 7e-4 here
BEAM_MARGIN = 0.004

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).norm() / reference.float().norm())


class Float32Outputs(TorchDispatchMode):
    """Records every op output in float32 with at least `min_numel` elements (activation-sized upcasts)."""

    def __init__(self, min_numel: int):
        super().__init__()
        self.min_numel = min_numel
        self.found: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.numel() >= self.min_numel:
                self.found.append((str(func), tuple(tensor.shape)))
        return output


class ScoreRecorder(TorchDispatchMode):
    """Keeps the outputs of matrix products `width` columns wide: the scores of every decoding step."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.scores: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        products = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.linear.default)
        if func in products and output.shape[-1] == self.width:
            self.scores.append(output.detach().float().clone())
        return output


def top2_margin(scores: torch.Tensor) -> torch.Tensor:
    best = scores.topk(2, dim=-1).values
    return best[..., 0] - best[..., 1]


def relative_margin(scores: torch.Tensor) -> torch.Tensor:
    """(B, V) step scores -> (B,) top-2 margin in units of the std of each row's finite (not suppressed) scores."""
    finite = torch.isfinite(scores)
    mean = scores.where(finite, 0).sum(-1, keepdim=True) / finite.sum(-1, keepdim=True)
    spread = ((scores - mean).where(finite, 0).pow(2).sum(-1) / (finite.sum(-1) - 1)).sqrt()
    return top2_margin(scores) / spread


def assert_equal_until_near_tie(ids, reference_ids, margins, minimum_compared: int):
    """ids (B, S) equal to reference_ids (B, S) at every step before float32's first relative margin (B, S) below
    MARGIN_FRACTION."""
    compared = 0
    for row, (got, expected, row_margins) in enumerate(zip(ids.tolist(), reference_ids.tolist(), margins.tolist(),
                                                           strict=True)):
        close = [step for step, margin in enumerate(row_margins) if margin < MARGIN_FRACTION]
        until = close[0] if close else len(expected)
        assert got[:until] == expected[:until], f"row {row}: bf16 {got} vs float32 {expected} (margins {row_margins})"
        compared += until
    assert compared >= minimum_compared, f"only {compared} steps had a clear float32 margin: the check is vacuous"


def bf16_copy(model, folder):
    """`model` saved and loaded again with `dtype=torch.bfloat16` (the user's path)."""
    model.save_pretrained(folder)
    loaded = type(model).from_pretrained(folder, dtype=BF16).eval()
    floating = {parameter.dtype for parameter in loaded.parameters() if parameter.is_floating_point()}
    assert floating == {BF16}, floating
    return loaded


# ------------------------------------------------------------------------------------------------ visual tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    torch.manual_seed(0)
    model = LaVITTokenizerModel(tiny_tokenizer_config()).eval()
    return model, bf16_copy(model, tmp_path_factory.mktemp("tokenizer"))


def code_margins(model, features):
    """float32 cosine margin between the nearest and second-nearest code of every token."""
    _, normalized = model.quantizer.lookup(model.quantizer.project_in(features))
    return top2_margin(normalized @ model.quantizer.codebook.t())


def random_keep_mask(model, batch_size: int, seed: int) -> torch.Tensor:
    """About half of the patches of each image, its first patch always kept."""
    keep_mask = torch.rand(batch_size, model.config.num_patches, generator=torch.Generator().manual_seed(seed)) < 0.5
    keep_mask[:, 0] = True
    return keep_mask


def test_tokenizer_bf16_weights_tokenize_encode_and_decode(tokenizers):
    model, bf16 = tokenizers
    pixel_values = photo_batch(model, 4)
    keep_mask = random_keep_mask(model, 4, seed=0)
    with torch.no_grad():
        reference = model.encode_features(pixel_values, keep_mask=keep_mask)
        reference_tokens = model.tokenize(pixel_values, keep_mask=keep_mask)
        tokens = bf16.tokenize(pixel_values.to(BF16), keep_mask=keep_mask)
        # the nearest-code search is float32 by design (distances T x codebook size); everything else stays bf16
        with Float32Outputs(min_numel=reference.features.numel() // 2) as upcasts:
            features = bf16.encode_features(pixel_values.to(BF16), keep_mask=keep_mask)
            decoded = bf16.decode_codes(tokens.code_ids, tokens.token_counts)
        reference_decoded = model.decode_codes(tokens.code_ids, tokens.token_counts)
        margins = code_margins(model, reference.features)
        _, latents = bf16.quantizer.lookup(bf16.quantizer.project_in(features.features))
    assert upcasts.found == [], upcasts.found
    assert features.features.dtype == BF16 and decoded.dtype == BF16 and latents.dtype == torch.float32
    assert relative_error(features.features, reference.features) < RELATIVE
    assert relative_error(decoded, reference_decoded) < RELATIVE
    clear = margins > MARGIN
    assert int(clear.sum()) >= len(margins) // 3
    assert torch.equal(tokens.code_ids[clear], reference_tokens.code_ids[clear])


def test_tokenizer_bf16_selection_is_float32_selection_away_from_the_threshold(tokenizers):
    model, bf16 = tokenizers
    pixel_values = photo_batch(model, 4)
    with torch.no_grad():
        reference = model.tokenize(pixel_values)
        tokens = bf16.tokenize(pixel_values.to(BF16))
    # the decision is float32 also in a bf16 model. This untrained selector's keep probabilities lie within 3e-6 of
    # the threshold (the check of agreement "away from it" this test once made compared nothing): bf16 rounded every
    # one to exactly 0.5 and each image kept a single token instead of 9 to 14 (atk37)
    assert tokens.keep_probs.dtype == torch.float32
    assert (tokens.keep_mask == reference.keep_mask).float().mean() >= 0.9
    assert (tokens.token_counts - reference.token_counts).abs().max() <= 2, (tokens.token_counts,
                                                                             reference.token_counts)


def test_tokenizer_float32_weights_under_autocast(tokenizers):
    model, _ = tokenizers
    pixel_values = photo_batch(model, 4)
    keep_mask = random_keep_mask(model, 4, seed=1)
    with torch.no_grad():
        reference = model.encode_features(pixel_values, keep_mask=keep_mask)
        with torch.autocast("cpu", dtype=BF16):
            features = model.encode_features(pixel_values, keep_mask=keep_mask)
            tokens = model.tokenize(pixel_values, keep_mask=keep_mask)
            _, latents = model.quantizer.lookup(model.quantizer.project_in(features.features))
        reference_ids = model.tokenize(pixel_values, keep_mask=keep_mask).code_ids
    assert features.features.dtype == BF16 and latents.dtype == torch.float32
    assert relative_error(features.features, reference.features) < RELATIVE
    clear = code_margins(model, reference.features) > MARGIN
    assert torch.equal(tokens.code_ids[clear], reference_ids[clear])


# ------------------------------------------------------------------------------------------------ unified model


@pytest.fixture(scope="module")
def unified(text_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    model = LaVITForCausalLM(tiny_lavit_config(text_vocab_size(text_tokenizer))).eval()
    return model, bf16_copy(model, tmp_path_factory.mktemp("unified"))


def caption_batch(processor, model):
    """Two captioned photos with a fixed keep mask (the selector of a random tokenizer sits near its threshold, where
    bf16 may keep another patch count and so change the sequence length)."""
    batch = processor(images=real_photos()[:2], text=["<image>a photo of a cat", "<image>a red bus"], padding=True,
                      return_tensors="pt")
    keep_mask = torch.rand(2, model.config.tokenizer_config.num_patches, generator=torch.Generator().manual_seed(0))
    batch["image_keep_mask"] = keep_mask < 0.5
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch, labels


def test_causal_lm_bf16_forward_and_loss(unified, lavit_processor):
    model, bf16 = unified
    batch, labels = caption_batch(lavit_processor, model)
    with torch.no_grad():
        reference = model(**batch, labels=labels)
        logits_size = reference.logits.numel()
        with Float32Outputs(min_numel=logits_size // 4) as upcasts:
            output = bf16(**{**batch, "pixel_values": batch["pixel_values"].to(BF16)})
        output_with_loss = bf16(**batch, labels=labels)  # float pixel values are cast by the model
    assert upcasts.found == [], upcasts.found
    assert output.logits.dtype == BF16 and output_with_loss.loss.dtype == torch.float32
    assert relative_error(output.logits, reference.logits) < RELATIVE
    for name in ("loss", "text_loss", "image_loss"):
        assert getattr(output_with_loss, name) == pytest.approx(float(getattr(reference, name)), rel=2e-2), name


def test_causal_lm_float32_weights_under_autocast_train_step(unified, lavit_processor):
    model, _ = unified
    batch, labels = caption_batch(lavit_processor, model)
    with torch.no_grad():
        reference = model(**batch, labels=labels).loss
    trained = type(model)(model.config)
    trained.load_state_dict(model.state_dict())
    trained.train()
    with torch.autocast("cpu", dtype=BF16):
        output = trained(**batch, labels=labels)
    output.loss.backward()
    assert output.logits.dtype == BF16 and output.loss.dtype == torch.float32
    assert float(output.loss) == pytest.approx(float(reference), rel=2e-2)
    gradients = [parameter.grad for parameter in trained.parameters() if parameter.grad is not None]
    assert gradients and all(grad.dtype == torch.float32 and torch.isfinite(grad).all() for grad in gradients)


def test_greedy_and_beam_generation_in_bf16(unified, lavit_processor):
    model, bf16 = unified
    batch, _ = caption_batch(lavit_processor, model)
    settings = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, output_scores=True,
                    return_dict_in_generate=True)
    beam_settings = dict(settings, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        reference = model.generate(**batch, **settings)
        greedy = bf16.generate(**batch, **settings)
        reference_beams = model.generate(**batch, **beam_settings)
        beams = bf16.generate(**batch, **beam_settings)
    prompt = batch["input_ids"].shape[1]
    margins = torch.stack([relative_margin(scores) for scores in reference.scores], dim=1)
    assert_equal_until_near_tie(greedy.sequences[:, prompt:], reference.sequences[:, prompt:], margins, 2)
    # beams: the best beam equals float32's where float32's two best beams are further apart (mean log-probability)
    # than bf16 moves them; scores come back float32 either way
    assert beams.sequences_scores.dtype == torch.float32
    scores = reference_beams.sequences_scores.view(-1, 2)
    clear = (scores[:, 0] - scores[:, 1]) > BEAM_MARGIN
    best, reference_best = beams.sequences.view(-1, 2, beams.sequences.shape[1])[:, 0], \
        reference_beams.sequences.view(-1, 2, reference_beams.sequences.shape[1])[:, 0]
    assert bool(clear.any()) and torch.equal(best[clear], reference_best[clear])
    assert torch.allclose(beams.sequences_scores, reference_beams.sequences_scores, atol=BEAM_MARGIN)


def test_image_token_generation_with_guidance_and_static_cache_in_bf16(unified, lavit_processor):
    model, bf16 = unified
    texts = ["a photo of a cat", "a red bus", "two dogs play in the park", "a rocket on the launch pad"]
    prompt = lavit_processor(text=texts, padding=True, return_tensors="pt")
    settings = dict(do_sample=False, guidance_scale=3.0, min_new_tokens=6, max_new_tokens=6)
    config = model.config
    with torch.no_grad(), ScoreRecorder(config.vocab_size) as recorder:  # the head's scores of every step
        reference = model.generate_image_tokens(**prompt, **settings)
    with torch.no_grad():
        dynamic = bf16.generate_image_tokens(**prompt, **settings)
        static = bf16.generate_image_tokens(**prompt, cache_implementation="static", **settings)
    assert torch.equal(static.code_ids, dynamic.code_ids)  # the static cache changes shapes, not arithmetic
    # guided log-probabilities of every step, rebuilt from the recorded conditional + unconditional scores
    margins = []
    for scores in recorder.scores[: settings["max_new_tokens"]]:
        scores = scores[:, config.image_end_token_id : config.visual_token_end]  # [/IMG] + one column per code
        conditional, unconditional = scores.log_softmax(dim=-1).chunk(2)
        guided = unconditional + settings["guidance_scale"] * (conditional - unconditional)
        margins.append(relative_margin(guided[:, 1:]))  # [/IMG] is excluded before min_new_tokens
    margins = torch.stack(margins, dim=1)
    assert_equal_until_near_tie(dynamic.code_ids.view(len(texts), -1), reference.code_ids.view(len(texts), -1),
                                margins, 3)


# ------------------------------------------------------------------------------------------------ detokenizer


@pytest.fixture(scope="module")
def detokenizers(tmp_path_factory):
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = LaVITDetokenizer(tiny_detokenizer_config()).eval()
    return model, bf16_copy(model, tmp_path_factory.mktemp("detokenizer"))


def test_detokenizer_decode_and_reconstruct_in_bf16(detokenizers, unified, lavit_processor):
    detokenizer, bf16 = detokenizers
    code_ids, token_counts = torch.tensor([1, 5, 7, 2, 9, 30, 4]), torch.tensor([3, 4])
    settings = dict(num_inference_steps=3, guidance_scale=3.0, output_type="pt")
    with torch.no_grad():
        reference = detokenizer.decode(code_ids, token_counts, generator=torch.Generator().manual_seed(0), **settings)
        with Float32Outputs(min_numel=reference.numel()) as upcasts:
            latents = bf16.decode(code_ids, token_counts, generator=torch.Generator().manual_seed(0),
                                  **{**settings, "output_type": "latent"})
        decoded = bf16.as_pipeline().decode_latents(latents)
        images = bf16.decode(code_ids, token_counts, generator=torch.Generator().manual_seed(0), **settings)
    # the UNet loop stays bf16; `decode` gives float32 pixels in [0, 1]; a bf16 VAE is not upcast (diffusers
    # upcasts only float16 VAEs that ask for it)
    assert upcasts.found == [], upcasts.found
    assert latents.dtype == BF16 and bf16.vae.dtype == BF16 and decoded.dtype == BF16
    assert images.dtype == torch.float32 and images.shape == reference.shape
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert relative_error(images, reference) < 0.1  # 3 guided denoising steps and a VAE, all in bf16

    # reconstruction through a bf16 LaVITPipeline (the language model's visual tokenizer, then the decoder)
    from lavit import LaVITPipeline

    _, bf16_model = unified
    pipe = LaVITPipeline.from_detokenizer(bf16_model, lavit_processor, bf16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.condition_encoder.dtype == BF16 and pipe.unet.dtype == BF16
    reconstructed = pipe.reconstruct(real_photos()[:2], num_inference_steps=2, output_type="pt").images
    # as diffusers pipelines: "pt" images keep the VAE's dtype; "np" / "pil" are float32 / uint8
    assert reconstructed.dtype == BF16 and torch.isfinite(reconstructed).all()
    assert 0 <= float(reconstructed.min()) and float(reconstructed.max()) <= 1


# ------------------------------------------------------------------------------------------------ training stages


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """A tiny tokenizer folder, a tiny LM and a photo dataset for the training entry points."""
    from conftest import write_stage_components

    return write_stage_components(tmp_path_factory.mktemp("stages"))


def run_stage(stage: str, inputs: dict, output_dir, bf16: bool):
    """Two optimizer steps of one training stage through its entry point; the logged losses and the final folder."""
    import json

    from conftest import training_args

    if stage == "lora" and "stage2" not in inputs:  # before this run's arguments: they set the accelerator state
        inputs["stage2"] = run_stage("pretrain", inputs, output_dir.parent / "lora_base", bf16=False)[1]
    arguments = training_args(output_dir, max_steps=2, logging_steps=1, per_device_train_batch_size=2, bf16=bf16)
    data = str(inputs["photos"])
    if stage == "tokenizer":
        from lavit.training.stage1_tokenizer import TokenizerTrainingArguments, train_tokenizer

        final = train_tokenizer(TokenizerTrainingArguments(data=data, tokenizer_config="tiny", resume="no"), arguments)
    elif stage == "pretrain":
        from lavit.training.stage2_pretrain import PretrainingArguments, pretrain

        final = pretrain(PretrainingArguments(data=data, visual_tokenizer=str(inputs["tokenizer"]),
                                              language_model=str(inputs["lm"]), max_length=96, resume="no"), arguments)
    elif stage == "lora":
        from lavit.training.finetune import FinetuningArguments, finetune

        final = finetune(FinetuningArguments(model=str(inputs["stage2"]), data=data, task="caption", lora=True,
                                             lora_r=4, resume="no"), arguments)
    else:
        from lavit.training.stage3_detokenizer import DetokenizerTrainingArguments, train_detokenizer

        final = train_detokenizer(DetokenizerTrainingArguments(
            data=data, visual_tokenizer=str(inputs["tokenizer"]), detokenizer_config="tiny", resume="no"), arguments)
    log = [json.loads(line) for line in (output_dir / "logs.jsonl").read_text().splitlines()]
    return [entry["loss"] for entry in log if "loss" in entry], final


@pytest.mark.slow  # over 10 s on 2 cores: CI's make test-slow runs it
@pytest.mark.parametrize("stage", ["tokenizer", "pretrain", "lora", "detokenizer"])
def test_training_stage_with_bf16_flag(stage, stage_inputs, tmp_path):
    """`--bf16` (float32 master weights under bf16 autocast), two steps: finite losses, the first (same weights, data
    and random draws: crops, Gumbel selection, noise) within 5e-2 of float32's, the second (after one bf16 update)
    within 1e-1, and a float32 checkpoint."""
    from safetensors.torch import load_file

    losses, final = run_stage(stage, stage_inputs, tmp_path / "bf16", bf16=True)
    reference, _ = run_stage(stage, stage_inputs, tmp_path / "fp32", bf16=False)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(reference[0], rel=5e-2), (losses, reference)
    assert losses[1] == pytest.approx(reference[1], rel=1e-1), (losses, reference)
    weights = load_file(next(final.rglob("*.safetensors")))  # a pipeline folder (stage 3) keeps them in sub-folders
    assert {tensor.dtype for tensor in weights.values() if tensor.is_floating_point()} == {torch.float32}


def test_official_conversion_loaded_in_bf16(parity_files, tmp_path):
    """`convert_release(..., dtype=torch.bfloat16)` on the official parity fixtures: bf16 throughout
    (the official fp32 LayerNorms and codebook included) and the official LM visual embeddings within bf16
    tolerance."""
    from lavit.modeling.convert_original_lavit import convert_release
    from official_release import write_official_release

    write_official_release(parity_files, tmp_path)
    heads = dict(vision_num_heads=4, merger_num_heads=4, decoder_num_heads=4)
    model, detokenizer = convert_release(tmp_path, dtype=BF16, **heads)
    # every saved tensor; the rotary frequencies (recomputed, never saved) stay float32 as transformers keeps them
    tensors = [*model.state_dict().values(), *detokenizer.state_dict().values()]
    assert {tensor.dtype for tensor in tensors if tensor.is_floating_point()} == {BF16}
    inputs, expected = parity_files["inputs"], parity_files["expected"]
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"].to(BF16), inputs["keep_mask"],
                                                   return_code_ids=True)
    code_ids = features.code_ids
    assert features.features.dtype == BF16 and code_ids.shape == expected["code_ids"].shape
    assert relative_error(features.features, expected["llm_visual_embeds"]) < RELATIVE


def test_a_pipeline_saved_in_bf16_loads_in_one_dtype_and_mixed_components_still_draw(pipeline_folder, tmp_path):
    """atk37 F2: a pipeline loaded in bf16 and saved, then loaded without a dtype, came back mixed (its transformers
    models in the saved bf16, diffusers' UNet and VAE in float32) and every drawing crashed in the UNet. Loading
    without a dtype gives float32 throughout (diffusers' default), with one gives it to every model, and a pipeline
    assembled from components of several dtypes (as a remote-code load can make) still draws: its UNet gets the
    conditions in its own dtype."""
    from lavit import LaVITPipeline

    LaVITPipeline.from_pretrained(pipeline_folder, torch_dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    models = ("language_model", "condition_encoder", "unet", "vae")
    for dtype in (None, torch.bfloat16):
        pipe = LaVITPipeline.from_pretrained(tmp_path / "bf16", **({"torch_dtype": dtype} if dtype else {}))
        assert {getattr(pipe, name).dtype for name in models} == {dtype or torch.float32}
    mixed = LaVITPipeline(**{**pipe.components, "unet": pipe.unet.to(torch.float32)})
    drawn = mixed("a cat", num_inference_steps=1, max_new_tokens=4, output_type="pt", height=32, width=32,
                  generator=torch.Generator().manual_seed(0)).images
    assert drawn.shape == (1, 3, 32, 32) and torch.isfinite(drawn).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "torch.bfloat16", "auto"])
def test_a_dtype_given_by_name_or_auto_is_one_dtype_for_every_model(pipeline_folder, tmp_path, dtype):
    """atk38: `torch_dtype="bfloat16"` (or "auto" on a bf16 save) loaded the transformers models in bf16 and
    diffusers' UNet and VAE in float32 (diffusers reads a torch.dtype only)."""
    from lavit import LaVITPipeline

    LaVITPipeline.from_pretrained(pipeline_folder, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    pipe = LaVITPipeline.from_pretrained(tmp_path / "bf16", torch_dtype=dtype)
    assert {getattr(pipe, name).dtype for name in ("language_model", "condition_encoder", "unet", "vae")} == {BF16}
    with pytest.raises(ValueError, match=r"torch_dtype \(or 'auto'\) must be float32, bfloat16, float16 .*got 'bf16'"):
        LaVITPipeline.from_pretrained(tmp_path / "bf16", torch_dtype="bf16")


def test_auto_reads_the_saved_dtype_of_every_folder_layout_and_names_a_bad_config(lavit_model, lavit_processor,
                                                                                 tmp_path):
    """atk39: "auto" read only a pipeline's `language_model/`: a lavit <= 0.x folder (the language model at its root,
    the decoder in `detokenizer/`) loaded in float32; a broken config.json was a bare JSONDecodeError."""
    from conftest import tiny_detokenizer_config

    from lavit import LaVITDetokenizer, LaVITPipeline

    legacy = tmp_path / "legacy"
    lavit_model.to(BF16).save_pretrained(legacy)
    lavit_model.to(torch.float32)
    lavit_processor.save_pretrained(legacy)
    LaVITDetokenizer(tiny_detokenizer_config()).to(BF16).save_pretrained(legacy / "detokenizer")
    pipe = LaVITPipeline.from_pretrained(legacy, torch_dtype="auto")
    assert {getattr(pipe, name).dtype for name in ("language_model", "condition_encoder", "unet", "vae")} == {BF16}
    (legacy / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"config.json is not a valid JSON file .*torch_dtype='auto' cannot read"):
        LaVITPipeline.from_pretrained(legacy, torch_dtype="auto")
