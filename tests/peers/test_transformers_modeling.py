"""transformers' own common model tests (`ModelTesterMixin`, `PipelineTesterMixin`) and config tests (`ConfigTester`)
of the installed release, run against lavit's classes with tiny configs. A test LaVIT cannot meet is skipped next to
its reason."""

import unittest

import torch
from conftest import tiny_tokenizer_config
from peer_tests import upstream_tests

from lavit import (
    LaVITConfig,
    LaVITDetokenizerConfig,
    LaVITForCausalLM,
    LaVITModel,
    LaVITTokenizerConfig,
    LaVITTokenizerModel,
)

UPSTREAM = upstream_tests("transformers")
test_modeling_common = __import__(f"{UPSTREAM}.test_modeling_common", fromlist=["ModelTesterMixin"])
test_configuration_common = __import__(f"{UPSTREAM}.test_configuration_common", fromlist=["ConfigTester"])
ModelTesterMixin = test_modeling_common.ModelTesterMixin
ConfigTester = test_configuration_common.ConfigTester
ids_tensor, floats_tensor = test_modeling_common.ids_tensor, test_modeling_common.floats_tensor

TEXT_VOCAB_SIZE = 99
# rows past the visual ids (allowed: what resize_token_embeddings adds), so the mixins' shrinking resize keeps them
SPARE_ROWS = 16
KEPT_PATCHES = 3

# LaVITModel is the base model `AutoModel` gives (lavit registers it at run time); the mixins recognise base models
# by transformers' static table, which only lists built-in models
test_modeling_common.MODEL_MAPPING_NAMES = {**test_modeling_common.MODEL_MAPPING_NAMES, "lavit": "LaVITModel"}


BUFFERS_REASON = ("LaVIT's VQ codebook is a buffer (EMA-updated, no optimizer touches it) that _init_weights fills "
                  "with random unit vectors, so two constructions differ by design")


class LaVITModelTester:
    """Tiny LaVIT batches in the shape transformers' mixins expect: `(config, inputs_dict)` where every row holds
    text ids and one compact `[IMG][/IMG]` placeholder, and `pixel_values` one image per row."""

    def __init__(self, parent, batch_size=2, seq_length=7, is_training=True):
        self.parent = parent
        self.batch_size, self.is_training = batch_size, is_training
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 32, 2, 4
        self.tokenizer_config = tiny_tokenizer_config()
        self.image_size = self.tokenizer_config.image_size
        self.patch_size = self.tokenizer_config.patch_size
        self.vocab_size = TEXT_VOCAB_SIZE + 2 + self.tokenizer_config.codebook_size + SPARE_ROWS
        self.text_length = seq_length
        # the LM's sequence: each row's `[IMG][/IMG]` grows by the image's KEPT_PATCHES tokens (fixed by
        # `image_keep_mask`, as pre-tokenized data gives them; the selector's count depends on the content)
        self.seq_length = seq_length + KEPT_PATCHES
        self.text_config = dict(
            model_type="llama", vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=64,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )

    def get_config(self) -> LaVITConfig:
        return LaVITConfig(text_config=dict(self.text_config), tokenizer_config=self.tokenizer_config.to_dict(),
                           text_vocab_size=TEXT_VOCAB_SIZE)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = ids_tensor([self.batch_size, self.text_length], TEXT_VOCAB_SIZE - 3) + 3
        input_ids[:, 1] = config.image_start_token_id
        input_ids[:, 2] = config.image_end_token_id
        attention_mask = torch.ones_like(input_ids)
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        image_keep_mask = torch.zeros(self.batch_size, self.tokenizer_config.num_patches, dtype=torch.bool)
        image_keep_mask[:, :KEPT_PATCHES] = True
        return config, {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                        "image_keep_mask": image_keep_mask}


class LaVITModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (LaVITModel, LaVITForCausalLM)
    # transformers' GenerationTesterMixin lives in tests/generation/, which the sdist does not ship;
    # test_transformers_generation.py tests its invariants on LaVITForCausalLM instead
    all_generative_model_classes = ()
    _is_composite = True

    def setUp(self):
        self.model_tester = LaVITModelTester(self)
        self.config_tester = ConfigTester(self, config_class=LaVITConfig, has_text_modality=False,
                                          common_properties=["text_vocab_size", "vocab_size"])

    @unittest.skip("LaVIT's encoder is the official EVA ViT, which runs SDPA only and returns no attention maps; "
                   "get_image_features returns its hidden states")
    def test_get_image_features_attentions(self):
        pass

    @unittest.skip(BUFFERS_REASON)
    def test_init_weights_can_init_buffers(self):
        pass

    def test_config(self):
        self.config_tester.run_common_tests()


class LaVITTokenizerModelTester:
    """Tiny visual-tokenizer batches: `pixel_values` only (its forward is the stage-1 reconstruction objective)."""

    def __init__(self, parent, batch_size=2):
        self.parent, self.batch_size, self.is_training = parent, batch_size, True
        self.config = tiny_tokenizer_config()
        self.image_size, self.patch_size = self.config.image_size, self.config.patch_size
        self.hidden_size = self.config.vision_config.hidden_size
        self.num_hidden_layers = self.config.vision_config.num_hidden_layers
        self.num_attention_heads = self.config.vision_config.num_attention_heads
        self.seq_length = self.config.num_patches + 1  # the EVA encoder's CLS token first

    def get_config(self) -> LaVITTokenizerConfig:
        return tiny_tokenizer_config()

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, 3, self.image_size, self.image_size])
        return self.get_config(), {"pixel_values": pixel_values}


class LaVITTokenizerModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (LaVITTokenizerModel,)
    test_resize_embeddings = False
    has_attentions = False

    def setUp(self):
        self.model_tester = LaVITTokenizerModelTester(self)
        self.config_tester = ConfigTester(self, config_class=LaVITTokenizerConfig, has_text_modality=False,
                                          common_properties=["codebook_size", "hidden_size"])

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(BUFFERS_REASON)
    def test_init_weights_can_init_buffers(self):
        pass

    @unittest.skip("an image-only model: no token embedding table (transformers' own ViT tests override this test)")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip("LaVIT's image encoder is frozen (requires_grad False, run under no_grad): its hidden states "
                   "carry no gradient by design")
    def test_retain_grad_hidden_states_attentions(self):
        pass


class LaVITDetokenizerConfigTest(unittest.TestCase):
    def test_config(self):
        ConfigTester(self, config_class=LaVITDetokenizerConfig, has_text_modality=False,
                     common_properties=["hidden_size", "codebook_size"]).run_common_tests()
