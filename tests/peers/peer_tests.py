"""The peers' own test suites (`make test-peers`): their test files are downloaded for the installed versions by
`tests/peers/download_peer_tests.py` into `.peers/`; without them every test here is skipped, naming the command."""

import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

import pytest

PEERS_CACHE = Path(__file__).resolve().parents[2] / ".peers"

# modules the upstream common files import but the sdist does not ship: what each stands for here
MISSING_UPSTREAM_MODULES = {
    "transformers": {
        # the export tester (torch.export of every model) lives in tests/exporters/, outside the sdist
        "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
        # tests/generation/ is outside the sdist: tests/peers/test_transformers_generation.py tests its invariants
        "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
        # the non-default values of PretrainedConfig's common arguments (the upstream file is outside the sdist)
        "utils.test_configuration_utils": {"config_common_kwargs": {
            "return_dict": False, "output_hidden_states": True, "output_attentions": True, "dtype": "float16",
            "tie_word_embeddings": False, "chunk_size_feed_forward": 5, "architectures": ["BertModel"],
            "id2label": {0: "label"}, "label2id": {"label": "0"}, "problem_type": "regression",
            "is_encoder_decoder": True, "tokenizer_class": "BertTokenizerFast",
        }},
    },
    "peft": {},
}
# top-level modules of the upstream repository (its utils/ folder, outside the sdist) that the common files import
MISSING_TOP_LEVEL_MODULES = {
    "transformers": {
        # maps a test image's URL to a CI cache; offline, the tests that need those images skip or fail on the URL
        "fetch_hub_objects_for_ci": {"url_to_local_path": lambda url, **kwargs: url},
    },
    "peft": {},
}


def upstream_tests(name: str) -> str:
    """Imports the downloaded `tests/` folder of the installed `name` as the package `<name>_upstream_tests` and
    returns that package name; skips the calling module when the files are absent."""
    version = importlib.metadata.version(name)
    folder = PEERS_CACHE / f"{name}-{version}" / "tests"
    if not folder.is_dir():
        pytest.skip(f"{name} {version}'s own tests are not downloaded; `make test-peers` fetches them into "
                    f"{folder.parent}", allow_module_level=True)
    package = f"{name}_upstream_tests"
    if package not in sys.modules:
        spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        sys.modules[package] = importlib.util.module_from_spec(spec)
        for module_name, attributes in MISSING_TOP_LEVEL_MODULES[name].items():
            if module_name not in sys.modules:
                sys.modules[module_name] = types.ModuleType(module_name)
                vars(sys.modules[module_name]).update(attributes)
        for dotted, attributes in MISSING_UPSTREAM_MODULES[name].items():
            if not (folder / (dotted.replace(".", "/") + ".py")).is_file():
                _register_stub(package, dotted, attributes)
    return package


def _register_stub(package: str, dotted: str, attributes: dict) -> None:
    parts = dotted.split(".")
    for depth in range(1, len(parts) + 1):
        module_name = ".".join([package, *parts[:depth]])
        if module_name not in sys.modules:
            module = types.ModuleType(module_name)
            module.__path__ = []
            sys.modules[module_name] = module
    vars(sys.modules[f"{package}.{dotted}"]).update(attributes)
