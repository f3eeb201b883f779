"""The README's `serve deploy` config is a valid Ray Serve config whose import path builds lavit's application."""

import importlib
import re

import yaml
from conftest import REPO_ROOT


def test_readme_cluster_config_builds_the_application():
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    readme = (REPO_ROOT / "README.md").read_text()
    blocks = [block for block in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "import_path" in block]
    assert len(blocks) == 1
    config = ServeDeploySchema.model_validate(yaml.safe_load(blocks[0]))
    for application in config.applications:
        module, _, name = application.import_path.partition(":")
        builder = getattr(importlib.import_module(module), name)
        assert isinstance(builder(application.args), Application)
