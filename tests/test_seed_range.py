"""One seed range everywhere a seed enters lavit (`SEED`: [0, 2**32 - 1], what torch's CPU generator reads; a wider
seed would silently repeat a narrower one's draws). The surface is found: every argparse flag of every `lavit`
command whose name holds "seed", every `seed` field of the serving request models and of the evaluation config, and
the lmms-eval adapter's `seed` generation setting."""

import argparse
import dataclasses

import pytest
import torch
from lavit.modeling.validation_lavit import SEED

from lavit.cli import build_parser


def seed_flags():
    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        for action in command._actions:
            if any("seed" in option for option in action.option_strings):
                yield f"lavit {name} {action.option_strings[0]}", action.type


def test_torch_reads_32_bits_of_a_cpu_seed():
    # why the range stops at 2**32 - 1: past it, seeds alias
    def draw(seed):
        return torch.rand(4, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(2**32)) and torch.equal(draw(5), draw(2**33 + 5))


def test_every_seed_flag_takes_the_one_range():
    flags = dict(seed_flags())
    assert len(flags) >= 5, flags
    for flag, kind in flags.items():
        assert kind is SEED or (kind.low, kind.high, kind.integer) == (SEED.low, SEED.high, True), flag


def test_serving_evaluation_and_lmms_eval_seeds_take_the_one_range():
    from lavit.evaluation import EvalConfig
    from lavit.serving.schemas import ChatCompletionRequest, ImageGenerationRequest

    for model in (ChatCompletionRequest, ImageGenerationRequest):
        seed = model.model_json_schema()["properties"]["seed"]["anyOf"][0]
        assert (seed["minimum"], seed["maximum"]) == (SEED.low, SEED.high), model.__name__
    assert "seed" in {field.name for field in dataclasses.fields(EvalConfig)}
    assert EvalConfig.field_ranges["seed"] is SEED
    lmms = pytest.importorskip("lavit.evaluation.lmms_eval_model", exc_type=ImportError)
    spec = lmms.GENERATION_SETTINGS["seed"]
    assert (spec.low, spec.high, spec.integer) == (SEED.low, SEED.high, True)
