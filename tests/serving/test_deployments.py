"""The `serve deploy` config of docs/serving.md is a valid Ray Serve config whose import path builds lavit's
application."""

import importlib
import re

import pytest
import yaml
from conftest import REPO_ROOT


def test_documented_cluster_config_builds_the_application():
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    page = (REPO_ROOT / "docs" / "serving.md").read_text()
    blocks = [block for block in re.findall(r"```yaml\n(.*?)```", page, re.S) if "import_path" in block]
    assert len(blocks) == 1
    config = ServeDeploySchema.model_validate(yaml.safe_load(blocks[0]))
    for application in config.applications:
        module, _, name = application.import_path.partition(":")
        builder = getattr(importlib.import_module(module), name)
        assert isinstance(builder(application.args), Application)


def test_replica_scaling_is_fixed_or_autoscaled():
    from lavit.serving.deployments import ServeSettings, replica_scaling

    assert replica_scaling(ServeSettings(model="m", replicas=2)) == {"num_replicas": 2}
    scaled = replica_scaling(ServeSettings(model="m", replicas=1, max_replicas=4, target_ongoing_requests=3,
                                           autoscaling={"downscale_delay_s": 5.0}))
    assert scaled == {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3,
                                             "downscale_delay_s": 5.0}}
    with pytest.raises(ValueError, match="max_replicas"):
        replica_scaling(ServeSettings(model="m", autoscaling={"downscale_delay_s": 5.0}))
    with pytest.raises(ValueError, match="--max-replicas 1 is below --replicas 2"):
        replica_scaling(ServeSettings(model="m", replicas=2, max_replicas=1))
    assert replica_scaling(ServeSettings(model="m", replicas=2, max_replicas=2)) == {"num_replicas": 2}
