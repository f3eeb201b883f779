"""An official LaVIT release folder built from the tiny parity fixtures (../shared/parity/official_tiny), for the
conversion tests of every folder, and the tolerance those tests compare with."""
import torch

ATOL = RTOL = 1e-5


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def write_official_release(parity_files, folder):
    """The official release layout (`language_model/` + `visual_tokenizer/`) from the tiny parity tensors and a tiny
    random LLaMA whose width is the parity `vit_proj` output (48); `.bin` files as in the real release."""
    from transformers import LlamaConfig, LlamaForCausalLM

    state = parity_files["tokenizer_state_dict"]

    def subset(prefixes, strip=""):
        return {key[len(strip):]: value for key, value in state.items() if key.startswith(prefixes)}

    codebook_size = state["quantize.embedding.weight"].shape[0]
    torch.manual_seed(0)
    language_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=40 + 2 + codebook_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
    ))
    language_model.save_pretrained(folder / "language_model")
    torch.save(subset(("causal_encoder.", "vit_proj.")), folder / "language_model" / "visual_weight.bin")
    (folder / "visual_tokenizer").mkdir()
    torch.save(subset(("encoder.",), strip="encoder."), folder / "visual_tokenizer" / "eva_vitg_psz14.bin")
    torch.save(subset(("token_predictor.", "causal_encoder.", "encode_task_layer.", "quantize.")),
               folder / "visual_tokenizer" / "tokenizer_encoder.bin")
    decoder_file = folder / "visual_tokenizer" / "highres_tokenizer_decoder.bin"
    torch.save(parity_files["highres_decoder_state_dict"], decoder_file)
    write_diffusers_folder(folder / "highres_pixel_decoding")
    return language_model


def write_diffusers_folder(folder):
    """`highres_pixel_decoding/` as diffusers saves it: a tiny SDXL-style UNet for the parity heads (60-d prompt, 36-d
    pooled vector), a tiny VAE and the official DDIM scheduler config."""
    from conftest import TINY_VAE_CONFIG, tiny_unet_config
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from lavit.modeling.configuration_lavit import SD_SCHEDULER_CONFIG

    torch.manual_seed(1)
    UNet2DConditionModel(**tiny_unet_config(60, 36)).save_pretrained(folder / "unet", safe_serialization=False)
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(folder / "vae")
    scheduler_config = {key: value for key, value in SD_SCHEDULER_CONFIG.items() if key != "_class_name"}
    DDIMScheduler(**scheduler_config).save_pretrained(folder / "scheduler")
