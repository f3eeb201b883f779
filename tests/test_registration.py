"""`lavit.registration` in this process (the fresh-process checks are tests/test_public_api.py's, marked slow): which
`__main__` counts as the `lavit` command, the lazy namespaces' `__getattr__`/`__dir__`, and `register_auto_classes`:
what it registers, once, again after a failed try, re-entrantly, and with a second thread waiting for the first."""
import sys
import threading
import types

import pytest

from lavit import registration
from lavit.registration import (
    COMMAND_SCRIPTS,
    lazy_namespace,
    register_auto_classes,
    started_as_the_lavit_command,
)

COMMAND_LINE = "import sys\nfrom lavit.cli import main\nsys.exit(main())\n"


def run_as_main(monkeypatch, path):
    main = types.ModuleType("__main__")
    if path is not None:
        main.__file__ = str(path)
    monkeypatch.setitem(sys.modules, "__main__", main)


@pytest.mark.parametrize("name", COMMAND_SCRIPTS)
def test_the_console_script_of_the_command_is_the_command(monkeypatch, tmp_path, name):
    script = tmp_path / name
    script.write_text(COMMAND_LINE)
    run_as_main(monkeypatch, script)
    assert started_as_the_lavit_command()


def test_a_script_is_the_command_only_with_the_commands_name_and_its_main(monkeypatch, tmp_path):
    own = tmp_path / "lavit"
    own.write_text("import lavit\nprint(lavit.__version__)\n")  # a user's script that happens to be named lavit
    other = tmp_path / "train.py"
    other.write_text(COMMAND_LINE)
    folder = tmp_path / "folder" / "lavit"
    folder.mkdir(parents=True)
    for path in (own, other, tmp_path / "missing" / "lavit", folder, None):
        run_as_main(monkeypatch, path)
        assert not started_as_the_lavit_command(), path


def namespace_of(package: str, classes: dict) -> tuple[dict, object, object]:
    namespace = {"__name__": package}
    get, listing = lazy_namespace(namespace, classes)
    return namespace, get, listing


def test_a_lazy_name_is_imported_from_its_module_on_first_use_and_kept():
    import json.decoder
    import os.path

    namespace, get, _ = namespace_of("json", {".decoder": ("JSONDecodeError",), "os.path": ("join",)})
    assert "JSONDecodeError" not in namespace
    assert get("JSONDecodeError") is json.decoder.JSONDecodeError  # a module relative to the namespace's package
    assert get("join") is os.path.join  # an absolute one
    assert namespace["JSONDecodeError"] is json.decoder.JSONDecodeError and "join" in namespace


def test_an_unknown_lazy_name_is_an_attribute_error_naming_the_package_and_the_name():
    _, get, _ = namespace_of("json", {".decoder": ("JSONDecodeError",)})
    with pytest.raises(AttributeError, match="module 'json' has no attribute 'JSONDecoderError'"):
        get("JSONDecoderError")


def test_dir_of_a_lazy_namespace_lists_bound_and_lazy_names_sorted():
    namespace, _, listing = namespace_of("json", {".decoder": ("JSONDecodeError", "JSONDecoder")})
    namespace["bound"] = 1
    assert listing() == sorted(["__name__", "bound", "JSONDecodeError", "JSONDecoder"])


def test_registration_makes_every_lavit_type_known_to_the_auto_classes_and_the_pipelines():
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.pipelines import PIPELINE_REGISTRY

    register_auto_classes()
    register_auto_classes()  # again: a no-op
    for model_type in ("lavit", "lavit_tokenizer", "lavit_detokenizer", "lavit_eva_vision"):
        assert model_type in CONFIG_MAPPING, model_type
        assert type(AutoConfig.for_model(model_type)).model_type == model_type
    assert "lavit-text-to-image" in PIPELINE_REGISTRY.get_supported_tasks()


@pytest.fixture
def unregistered(monkeypatch):
    """A process before its registration (the real one is done: its registrations are idempotent)."""
    monkeypatch.setattr(registration, "_registered", False)
    monkeypatch.setattr(registration, "_in_progress", False)


def test_a_failed_registration_is_done_again_by_the_next_call(monkeypatch, unregistered):
    real_register = registration._register

    def interrupted():
        raise ImportError("interrupted import")

    monkeypatch.setattr(registration, "_register", interrupted)
    with pytest.raises(ImportError, match="interrupted import"):
        register_auto_classes()
    assert not registration._registered and not registration._in_progress
    monkeypatch.setattr(registration, "_register", real_register)
    register_auto_classes()
    assert registration._registered


def test_a_registration_asked_for_again_while_it_runs_returns_at_once(monkeypatch, unregistered):
    """An import made by the registration itself may use a namespace, which registers: no recursion, no deadlock."""
    calls = []

    def register_that_imports_a_namespace():
        calls.append(registration._registered)
        register_auto_classes()

    monkeypatch.setattr(registration, "_register", register_that_imports_a_namespace)
    register_auto_classes()
    assert calls == [False] and registration._registered


def test_a_second_thread_waits_for_a_registration_in_progress(monkeypatch, unregistered):
    started, release, calls = threading.Event(), threading.Event(), []

    def slow_register():
        calls.append("register")
        started.set()
        release.wait(5)

    monkeypatch.setattr(registration, "_register", slow_register)
    first = threading.Thread(target=register_auto_classes)
    first.start()
    assert started.wait(5)
    second = threading.Thread(target=register_auto_classes)
    second.start()
    second.join(0.05)
    assert second.is_alive(), "the second thread went on before the registration was complete"
    release.set()
    first.join(5)
    second.join(5)
    assert calls == ["register"] and registration._registered
