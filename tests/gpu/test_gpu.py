"""GPU paths: bf16 tokenization, the SDPA merger and compiled image-token decoding on CUDA (skipped without a
GPU)."""

import importlib.util

import pytest
import torch
from conftest import has_cuda, photo_batch, text_vocab_size, tiny_tokenizer_config

from lavit import LaVITTokenizerModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device")]


@pytest.mark.parametrize("attention", ["exact", "official"])
def test_bf16_cuda_matches_float32_cpu(attention):
    torch.manual_seed(0)
    model = LaVITTokenizerModel(tiny_tokenizer_config(merger_attention=attention)).eval()
    pixel_values = photo_batch(model, 4)
    keep_mask = torch.rand(4, model.config.num_patches, generator=torch.Generator().manual_seed(0)) < 0.4
    keep_mask[:, 0] = True
    reference = model.encode_features(pixel_values, keep_mask=keep_mask).features
    gpu_model = model.to("cuda", torch.bfloat16)
    features = gpu_model.encode_features(pixel_values.to("cuda", torch.bfloat16), keep_mask=keep_mask.cuda())
    relative_error = (features.features.float().cpu() - reference).norm() / reference.norm()
    assert relative_error < 2e-2
    tokens = gpu_model.tokenize(pixel_values.to("cuda", torch.bfloat16), keep_mask=keep_mask.cuda())
    assert tokens.code_ids.device.type == "cuda" and tokens.code_ids.numel() == int(keep_mask.sum())


def test_variable_counts_across_calls_on_cuda():
    torch.manual_seed(0)
    model = LaVITTokenizerModel(tiny_tokenizer_config()).to("cuda", torch.bfloat16).eval()
    pixel_values = torch.randn(8, 3, 56, 56, device="cuda", dtype=torch.bfloat16)
    generator = torch.Generator(device="cuda").manual_seed(0)
    counts = {tuple(model.tokenize(pixel_values, mode="sample", generator=generator).token_counts.tolist())
              for _ in range(5)}
    assert len(counts) > 1


def test_compiled_static_cache_decoding_gives_the_dynamic_tokens_on_cuda():
    from conftest import tiny_lavit_config, tiny_text_tokenizer

    from lavit import LaVITForCausalLM, LaVITImageProcessor, LaVITProcessor

    text_tokenizer = tiny_text_tokenizer()
    torch.manual_seed(0)
    model = LaVITForCausalLM(tiny_lavit_config(text_vocab_size(text_tokenizer))).cuda().eval()
    processor = LaVITProcessor(LaVITImageProcessor(size={"height": 56, "width": 56}), text_tokenizer)
    prompt = processor(text=["a photo of a cat", "a red bus"], padding=True, return_tensors="pt").to("cuda")
    settings = dict(do_sample=False, guidance_scale=3.0, min_new_tokens=4, max_new_tokens=8)
    dynamic = model.generate_image_tokens(**prompt, **settings)
    compiled = model.generate_image_tokens(**prompt, cache_implementation="static", compile_decoding=True, **settings)
    assert compiled.code_ids.tolist() == dynamic.code_ids.tolist()


def test_bf16_unified_model_on_cuda_matches_float32_cpu():
    """bf16 weights on CUDA, and float32 weights under CUDA autocast with a backward pass (the Trainer's --bf16): the
    loss of the CPU float32 model within 3e-2, finite float32 gradients."""
    from conftest import real_photos, tiny_lavit_config, tiny_text_tokenizer

    from lavit import LaVITForCausalLM, LaVITImageProcessor, LaVITProcessor

    text_tokenizer = tiny_text_tokenizer()
    torch.manual_seed(0)
    model = LaVITForCausalLM(tiny_lavit_config(text_vocab_size(text_tokenizer))).eval()
    processor = LaVITProcessor(LaVITImageProcessor(size={"height": 56, "width": 56}), text_tokenizer)
    batch = processor(images=real_photos()[:2], text=["<image>a photo of a cat", "<image>a red bus"], padding=True,
                      return_tensors="pt")
    batch["image_keep_mask"] = torch.rand(2, model.config.tokenizer_config.num_patches,
                                          generator=torch.Generator().manual_seed(0)) < 0.5
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        reference = float(model(**batch, labels=labels).loss)
    on_cuda = {key: value.cuda() for key, value in batch.items()}
    trained = LaVITForCausalLM(model.config).cuda().train()
    trained.load_state_dict(model.state_dict())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = trained(**on_cuda, labels=labels.cuda()).loss
    loss.backward()
    assert float(loss) == pytest.approx(reference, rel=3e-2)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in trained.parameters()
               if p.grad is not None)
    bf16 = model.to("cuda", torch.bfloat16)
    with torch.no_grad():
        output = bf16(**on_cuda, labels=labels.cuda())
    assert output.logits.dtype == torch.bfloat16 and float(output.loss) == pytest.approx(reference, rel=3e-2)


# ------------------------------------------------------------------------------------------ issue 30: fast paths


def cuda_model_and_batch(seed: int = 0):
    """A tiny float32 LaVIT model on CUDA in training mode, and a batch of two captioned photos (keep masks given)."""
    from conftest import real_photos, tiny_lavit_config, tiny_text_tokenizer

    from lavit import LaVITForCausalLM, LaVITImageProcessor, LaVITProcessor

    text_tokenizer = tiny_text_tokenizer()
    torch.manual_seed(seed)
    model = LaVITForCausalLM(tiny_lavit_config(text_vocab_size(text_tokenizer))).cuda().train()
    processor = LaVITProcessor(LaVITImageProcessor(size={"height": 56, "width": 56}), text_tokenizer)
    batch = processor(images=real_photos()[:2], text=["<image>a photo of a cat", "a red bus<image>"], padding=True,
                      return_tensors="pt")
    batch["image_keep_mask"] = torch.rand(2, model.config.tokenizer_config.num_patches,
                                          generator=torch.Generator().manual_seed(0)) < 0.5
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model, processor, {key: value.cuda() for key, value in batch.items()}


def loss_and_gradients(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_flex_attention_trains_packed_rows_as_sdpa_does_on_cuda():
    """The CUDA default for packed stage-2 rows: FlexAttention's loss and gradients are SDPA's (float32)."""
    model, _, batch = cuda_model_and_batch()
    rows = [ids[mask.bool()] for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    packed = dict(input_ids=torch.cat(rows)[None], labels=torch.cat(rows)[None].clone(), use_cache=False,
                  position_ids=torch.cat([torch.arange(len(row)) for row in rows])[None].cuda(),
                  pixel_values=batch["pixel_values"], image_keep_mask=batch["image_keep_mask"])
    results = {}
    for kernel in ("sdpa", "flex_attention"):
        model.get_decoder().set_attn_implementation(kernel)
        results[kernel] = loss_and_gradients(model, packed)
    assert torch.allclose(results["flex_attention"][0], results["sdpa"][0], rtol=1e-4)
    for name, gradient in results["sdpa"][1].items():
        assert torch.allclose(results["flex_attention"][1][name], gradient, rtol=1e-3, atol=1e-5), name


def test_generate_defaults_to_the_compiled_static_cache_on_cuda_with_the_same_tokens():
    model, processor, batch = cuda_model_and_batch()
    model.eval()
    assert model.default_cache_settings({}) == {"cache_implementation": "static"}
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    default = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    dynamic = model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="dynamic")
    assert default.tolist() == dynamic.tolist()
    prompt = processor(text=["a photo of a cat", "a red bus"], padding=True, return_tensors="pt").to("cuda")
    settings = dict(do_sample=False, guidance_scale=3.0, min_new_tokens=4, max_new_tokens=8)
    tokens = model.generate_image_tokens(**prompt, **settings)  # CUDA default: static cache, compiled step
    eager = model.generate_image_tokens(**prompt, cache_implementation="dynamic", compile_decoding=False, **settings)
    assert tokens.code_ids.tolist() == eager.code_ids.tolist()


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel (lavit[liger])")
def test_liger_kernels_on_cuda_keep_the_loss_and_gradients():
    """Last in this file: Liger patches transformers' LLaMA module for the rest of the process. The Trainer's own call
    with Liger's defaults (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) against the same weights without."""
    from lavit.modeling.kernels_lavit import register_liger_kernel
    from transformers.integrations.liger import apply_liger_kernel

    from lavit import LaVITForCausalLM

    reference, _, batch = cuda_model_and_batch()
    loss, gradients = loss_and_gradients(reference, batch)
    register_liger_kernel()
    patched = LaVITForCausalLM(reference.config).cuda().train()
    patched.load_state_dict(reference.state_dict())
    apply_liger_kernel(patched, {})
    assert patched.linear_cross_entropy is not None
    fused_loss, fused_gradients = loss_and_gradients(patched, batch)
    assert torch.allclose(fused_loss, loss, rtol=1e-4), (fused_loss, loss)
    for name, gradient in gradients.items():
        assert torch.allclose(fused_gradients[name], gradient, rtol=1e-3, atol=1e-5), name
    assert patched(**batch).logits is None  # training with targets: no logits made
