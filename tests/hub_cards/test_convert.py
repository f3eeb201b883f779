"""`lavit.hub_cards.convert.convert_release_folder` on a tiny official release (the parity fixtures): what it returns
without the pixel decoder (the model, a processor that fits it, no pipeline, the card's metadata), the dtype it is
asked for, and its refusals: a folder that is not a release, and a tokenizer that does not fit the LM. (A release with
its pixel decoder, converted into a pipeline, is tests/test_cli.py's `convert-original` test.)"""
import shutil

import pytest
import torch
from lavit.hub_cards.convert import convert_release_folder

TEXT_TOKENS = 40  # the text ids of the parity release's LM (`write_official_release`)


def save_word_tokenizer(folder, text_tokens: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"word{index}": index for index in range(3, text_tokens)}}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(folder)


@pytest.fixture(scope="module")
def release(parity_files, tmp_path_factory):
    """The official layout of tests/official_release.py without its pixel decoder (diffusers' folders take seconds to
    write): a tiny random LLaMA as wide as the parity `vit_proj` output (48), and the parity tokenizer tensors."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("release") / "LaVIT-tiny"
    state = parity_files["tokenizer_state_dict"]

    def subset(prefixes, strip=""):
        return {key[len(strip):]: value for key, value in state.items() if key.startswith(prefixes)}

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=TEXT_TOKENS + 2 + state["quantize.embedding.weight"].shape[0], hidden_size=48,
                         intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         tie_word_embeddings=False)
    # the files `save_pretrained` writes, without the seconds its first call spends importing;
    # in float16, a dtype other than torch's default
    (folder / "language_model").mkdir(parents=True)
    config.to_json_file(folder / "language_model" / "config.json")
    weights = {name: tensor.half() for name, tensor in LlamaForCausalLM(config).state_dict().items()}
    save_file(weights, folder / "language_model" / "model.safetensors", metadata={"format": "pt"})
    torch.save(subset(("causal_encoder.", "vit_proj.")), folder / "language_model" / "visual_weight.bin")
    (folder / "visual_tokenizer").mkdir()
    torch.save(subset(("encoder.",), strip="encoder."), folder / "visual_tokenizer" / "eva_vitg_psz14.bin")
    torch.save(subset(("token_predictor.", "causal_encoder.", "encode_task_layer.", "quantize.")),
               folder / "visual_tokenizer" / "tokenizer_encoder.bin")
    save_word_tokenizer(folder / "language_model", TEXT_TOKENS)
    return folder


def test_a_release_without_its_pixel_decoder_gives_the_model_a_fitting_processor_and_no_pipeline(release):
    model, processor, pipeline, metadata = convert_release_folder(release, pixel_decoder=None, num_heads=4)
    assert pipeline is None
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float16}  # the release's own dtype
    config = model.config
    assert config.text_vocab_size == TEXT_TOKENS
    assert processor.tokenizer.convert_tokens_to_ids("[IMG]") == TEXT_TOKENS  # image tokens right after the text
    assert processor.tokenizer.convert_tokens_to_ids("[/IMG]") == TEXT_TOKENS + 1
    size = processor.image_processor.size
    assert (size["height"], size["width"]) == (config.tokenizer_config.image_size,) * 2
    assert f"`{release.name}`" in metadata["summary"] and "no training here" in metadata["training_stages"][0][
        "description"]


def test_a_named_dtype_replaces_the_releases_own(release):
    model, *_ = convert_release_folder(release, pixel_decoder=None, dtype="bfloat16", num_heads=4)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


def test_a_folder_without_both_release_parts_is_refused_naming_them(release, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(release / "language_model", partial / "language_model")
    with pytest.raises(ValueError, match=r"partial is not an official LaVIT release folder \(language_model/ and "
                                         r"visual_tokenizer/ expected\)"):
        convert_release_folder(partial)


def test_a_tokenizer_that_does_not_fit_the_language_model_is_refused(release, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(release, other)
    save_word_tokenizer(other / "language_model", TEXT_TOKENS - 1)
    with pytest.raises(ValueError, match=f"the release's tokenizer has {TEXT_TOKENS - 1} text tokens, the LM "
                                         f"{TEXT_TOKENS}"):
        convert_release_folder(other, pixel_decoder=None, num_heads=4)
