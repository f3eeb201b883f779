"""PEFT's own common adapter tests (`PeftCommonTester` of the installed release's `tests/testing_common.py`), run on a
tiny saved LaVIT with adapters on its language model and on its trainable visual merger and projection: save/load,
merge, safe merge, idempotent merge, disabling and deleting adapters, training."""

import pytest
import torch
from conftest import tiny_tokenizer_config
from peer_tests import upstream_tests

from lavit import LaVITConfig, LaVITForCausalLM

UPSTREAM = upstream_tests("peft")
testing_common = __import__(f"{UPSTREAM}.testing_common", fromlist=["PeftCommonTester"])
from peft import IA3Config, LoraConfig  # noqa: E402

TEXT_VOCAB_SIZE = 60
# adapters where LaVIT trains: the LM's attention, and the LM-side visual merger and projection (never the frozen
# visual tokenizer, whose targets they would change; see lavit.training.lora)
CASES = [
    ("lora-lm", LoraConfig, {"target_modules": r".*language_model.*\.(q_proj|v_proj)", "init_lora_weights": False}),
    ("lora-visual", LoraConfig, {"target_modules": r"model\.(visual_projection|visual_merger\..*\.fc1)",
                                 "init_lora_weights": False}),
    ("ia3-lm", IA3Config, {"target_modules": r".*language_model.*\.(k_proj|down_proj)",
                           "feedforward_modules": r".*down_proj", "init_ia3_weights": False}),
]
CASE_IDS = [case[0] for case in CASES]


@pytest.fixture(scope="module")
def lavit_model_id(tmp_path_factory):
    tokenizer_config = tiny_tokenizer_config()
    config = LaVITConfig(
        text_config=dict(model_type="llama", vocab_size=TEXT_VOCAB_SIZE + 2 + tokenizer_config.codebook_size,
                         hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        tokenizer_config=tokenizer_config, text_vocab_size=TEXT_VOCAB_SIZE,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lavit")
    LaVITForCausalLM(config).save_pretrained(folder)
    return str(folder)


class TestPeftOnLaVIT(testing_common.PeftCommonTester):
    transformers_class = LaVITForCausalLM
    torch_device = "cpu"

    def prepare_inputs_for_testing(self):
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(3, TEXT_VOCAB_SIZE, (2, 7), generator=generator)
        input_ids[:, 2], input_ids[:, 3] = TEXT_VOCAB_SIZE, TEXT_VOCAB_SIZE + 1  # one `[IMG][/IMG]` per row
        image_size = tiny_tokenizer_config().image_size
        keep_mask = torch.zeros(2, tiny_tokenizer_config().num_patches, dtype=torch.bool)
        keep_mask[:, :3] = True
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": torch.randn(2, 3, image_size, image_size, generator=generator),
                "image_keep_mask": keep_mask}

    @pytest.mark.parametrize("name, config_cls, config_kwargs", CASES, ids=CASE_IDS)
    def test_save_pretrained(self, lavit_model_id, name, config_cls, config_kwargs):
        self._test_save_pretrained(lavit_model_id, config_cls, config_kwargs)

    @pytest.mark.parametrize("name, config_cls, config_kwargs", CASES, ids=CASE_IDS)
    def test_merge_layers(self, lavit_model_id, name, config_cls, config_kwargs):
        self._test_merge_layers(lavit_model_id, config_cls, config_kwargs)

    @pytest.mark.parametrize("name, config_cls, config_kwargs", CASES, ids=CASE_IDS)
    def test_merge_layers_is_idempotent(self, lavit_model_id, name, config_cls, config_kwargs):
        self._test_merge_layers_is_idempotent(lavit_model_id, config_cls, config_kwargs)

    @pytest.mark.parametrize("name, config_cls, config_kwargs", CASES, ids=CASE_IDS)
    def test_safe_merge(self, lavit_model_id, name, config_cls, config_kwargs):
        self._test_safe_merge(lavit_model_id, config_cls, config_kwargs)

    @pytest.mark.parametrize("name, config_cls, config_kwargs", CASES, ids=CASE_IDS)
    def test_disable_adapter(self, lavit_model_id, name, config_cls, config_kwargs):
        self._test_disable_adapter(lavit_model_id, config_cls, config_kwargs)

    @pytest.mark.parametrize("name, config_cls, config_kwargs", CASES, ids=CASE_IDS)
    def test_delete_adapter(self, lavit_model_id, name, config_cls, config_kwargs):
        self._test_delete_adapter(lavit_model_id, config_cls, config_kwargs)
