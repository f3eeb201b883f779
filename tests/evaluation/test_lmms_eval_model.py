"""The lmms-eval adapter: `--model lavit` found through the entry point, run on a local task definition (a
`save_to_disk` dataset of photos), offline. Skipped when lmms-eval is not installed (`pip install lavit[lmms]`)."""

import textwrap

import pytest
import torch
from conftest import real_photos
from PIL import Image

lmms_eval = pytest.importorskip("lmms_eval")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TASK = """\
task: lavit_photo_vqa
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function photo_utils.doc_to_visual
doc_to_text: !function photo_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_new_tokens: 4
  num_beams: 2
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

UTILS = """\
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return "Question: " + doc["question"] + " Answer:"
"""


QUESTIONS = ["what is it?", "what color?", "is it red?"]


@pytest.fixture
def task_folder(tmp_path):
    import datasets

    photos = [Image.fromarray(photo).resize((64, 64)) for photo in real_photos()[:3]]
    table = datasets.Dataset.from_dict({"image": photos, "question": QUESTIONS,
                                        "answer": ["cat", "red", "yes"]}).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": table}).save_to_disk(tmp_path / "data")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "lavit_photo_vqa.yaml").write_text(TASK.format(data=tmp_path / "data"))
    (tmp_path / "tasks" / "photo_utils.py").write_text(textwrap.dedent(UTILS))
    return tmp_path


@pytest.fixture
def model_folder(tmp_path, lavit_model, lavit_processor):
    lavit_model.save_pretrained(tmp_path / "model")
    lavit_processor.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_lmms_eval_runs_a_local_image_task_with_the_lavit_model(task_folder, model_folder, lavit_model,
                                                                 lavit_processor):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    from lavit.evaluation.lmms_eval_model import LaVITLmms

    assert get_model("lavit") is LaVITLmms  # the entry point of the installed package
    results = simple_evaluate(model="lavit", model_args=f"pretrained={model_folder}", tasks=["lavit_photo_vqa"],
                              batch_size=2, device="cpu", log_samples=True,
                              task_manager=TaskManager(include_path=str(task_folder / "tasks")))
    samples = results["samples"]["lavit_photo_vqa"]
    assert len(samples) == 3
    # the answers are what the model generates directly with the task's settings, cut at the task's stop string
    for sample in sorted(samples, key=lambda sample: sample["doc_id"]):
        image = Image.fromarray(real_photos()[sample["doc_id"]]).resize((64, 64))
        prompt = f"<image>Question: {QUESTIONS[sample['doc_id']]} Answer:"
        inputs = lavit_processor(images=[image], text=prompt, return_tensors="pt")
        output = lavit_model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
        expected = lavit_processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert sample["resps"][0][0] == expected[0].split("\n")[0].strip()
    matches = [float(sample["resps"][0][0] == sample["target"]) for sample in samples]
    assert results["results"]["lavit_photo_vqa"]["exact_match,none"] == pytest.approx(sum(matches) / 3)


def test_loglikelihood_is_the_continuation_loss(model_folder, lavit_model, lavit_processor):
    from lmms_eval.api.instance import Instance

    from lavit.evaluation.lmms_eval_model import LaVITLmms

    adapter = LaVITLmms(pretrained=str(model_folder), device="cpu")
    image = Image.fromarray(real_photos()[1]).resize((64, 64))
    adapter.task_dict = {"photos": {"test": [{"image": image}]}}
    request = Instance(request_type="loglikelihood", arguments=("Question: what is it? Answer:", " a cat",
                                                               lambda doc: [doc["image"]], 0, "photos", "test"),
                       idx=0, metadata={"task": "photos", "doc_id": 0, "repeats": 1})
    [(loss, _)] = adapter.loglikelihood([request])

    prompt = lavit_processor(images=[image], text="<image>Question: what is it? Answer:", return_tensors="pt")
    full = lavit_processor(images=[image], text="<image>Question: what is it? Answer: a cat", return_tensors="pt")
    count = full["input_ids"].shape[1] - prompt["input_ids"].shape[1]
    with torch.no_grad():
        logits = lavit_model(**full).logits[0]
    log_probs = logits.log_softmax(dim=-1)
    # the mean negative log-probability of the continuation's tokens: lmms-eval's multiple-choice tasks take the lowest
    expected = -sum(float(log_probs[-count - 1 + offset, full["input_ids"][0, -count + offset]])
                    for offset in range(count)) / count
    assert count > 0 and loss == pytest.approx(expected, rel=1e-4)

    # generation requests are batched only with neighbours of the same settings (one task's)
    def generation_request(settings):
        return Instance(request_type="generate_until", arguments=("Question: what? Answer:", settings,
                                                                  lambda doc: [doc["image"]], 0, "photos", "test"),
                        idx=0, metadata={"task": "photos", "doc_id": 0, "repeats": 1})

    adapter.batch_size = 2
    short, long = generation_request({"max_new_tokens": 2}), generation_request({"max_new_tokens": 3})
    assert [len(batch) for batch in adapter._batches([short, short, short, long])] == [2, 1, 1]
    answers = adapter.generate_until([short, long])
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    with pytest.raises(ValueError, match="unknown model_args 'temperature'"):
        LaVITLmms(pretrained=str(model_folder), device="cpu", temperature=1)
    with pytest.raises(ValueError, match=r"unknown model_args 'pretrainde' \(did you mean 'pretrained'\?\)"):
        LaVITLmms(pretrained=str(model_folder), device="cpu", pretrainde="x")


def test_importing_the_adapter_first_still_registers_the_model():
    import subprocess
    import sys

    # the adapter's module imported before lmms-eval's registry: the registry loads the entry point mid-import
    code = ("import lavit.evaluation.lmms_eval_model; from lmms_eval.models import get_model; "
            "print(get_model('lavit').__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "LaVITLmms"


def bad_values(spec) -> list:
    """Values outside a declared range or choice: the wrong type, NaN, and just past each bound."""
    from lavit.modeling.validation_lavit import Choice

    if isinstance(spec, Choice):
        return ["yes", 1, 0.5]
    values = ["4", float("nan"), float("inf")]
    step = 1 if spec.integer else 0.5
    if spec.low is not None:
        values.append(spec.low if spec.low_open else spec.low - step)
    if spec.high is not None:
        values.append(spec.high + step)
    if spec.integer:
        values.append(2.5)
    return values


def test_every_generation_setting_is_honoured_or_refused():
    from lavit.evaluation.lmms_eval_model import GENERATION_SETTINGS, generation_settings

    for name, spec in GENERATION_SETTINGS.items():
        for value in bad_values(spec):
            with pytest.raises(ValueError, match=f"generation_kwargs {name} must be"):
                generation_settings({name: value}, 32)
        # None is the setting's default, never an AttributeError
        assert generation_settings({name: None}, 32) == generation_settings({}, 32)
    # each setting given a value in range reaches `generate` (sampling settings when sampling)
    given = {"max_new_tokens": 7, "temperature": 0.5, "top_p": 0.3, "top_k": 5, "num_beams": 2,
             "repetition_penalty": 1.2, "do_sample": True, "seed": 2**32 - 1}
    assert set(given) == set(GENERATION_SETTINGS)
    generation, until = generation_settings({**given, "until": "\n"}, 32)
    generator = generation.pop("generator")
    assert {**generation, "seed": given["seed"]} == given and until == ["\n"]
    assert generator.initial_seed() == given["seed"]
    assert generation_settings({"max_new_tokens": None}, 32)[0] == {"max_new_tokens": 32, "num_beams": 1,
                                                                     "do_sample": False}
    assert generation_settings({"temperature": 0.2}, 32)[0]["do_sample"] is True  # lmms-eval's convention
    # greedy ignores the sampling settings, as `generate` does; do_sample false wins over a temperature
    assert "temperature" not in generation_settings({"temperature": 0.7, "do_sample": False, "top_p": 0}, 32)[0]
    with pytest.raises(ValueError, match="do_sample is true but temperature is 0"):
        generation_settings({"do_sample": True, "temperature": 0}, 32)
    with pytest.raises(ValueError, match=r"unknown generation_kwargs \['beams'\]"):
        generation_settings({"beams": 2}, 32)
    for until in ([1], {"a": 1}, 3):
        with pytest.raises(ValueError, match="until must be a string or a list of strings"):
            generation_settings({"until": until}, 32)
    assert generation_settings({"until": None, "image_aspect_ratio": "pad"}, 32)[1] == []


def lmms_request(kind, context, second, doc_id=0):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=(context, second, lambda doc: doc["images"], doc_id, "photos",
                                                  "test"),
                    idx=0, metadata={"task": "photos", "doc_id": doc_id, "repeats": 1})


@pytest.fixture
def adapter(model_folder):
    from lavit.evaluation.lmms_eval_model import LaVITLmms

    adapter = LaVITLmms(pretrained=str(model_folder), device="cpu")
    photos = [Image.fromarray(photo).resize((64, 64)) for photo in real_photos()[:2]]
    adapter.task_dict = {"photos": {"test": [{"images": photos[:1]}, {"images": photos}]}}
    return adapter


def test_generation_requests_with_bad_settings_fail_before_generating(adapter):
    # the attack's cases: each was silently replaced (0 -> 32 tokens, NaN/-1 -> greedy, 0 beams -> 1) or crashed
    for settings in [{"max_new_tokens": 0}, {"temperature": float("nan")}, {"temperature": -1}, {"num_beams": 0},
                     {"num_beams": -3}, {"max_new_tokens": "4"}]:
        with pytest.raises(ValueError, match="lavit: generation_kwargs"):
            adapter.generate_until([lmms_request("generate_until", "Question: what? Answer:", settings)])
    assert isinstance(adapter.generate_until([lmms_request("generate_until", "hi", None)])[0], str)


def test_placeholders_that_do_not_match_the_images_are_refused(adapter):
    settings = {"max_new_tokens": 2}
    for context, doc_id in [("<image> compare", 1), ("<image> <image> compare", 0), ("<image><image><image> x", 1)]:
        with pytest.raises(ValueError, match=r"placeholder\(s\) for \d image\(s\)"):
            adapter.generate_until([lmms_request("generate_until", context, settings, doc_id)])
        with pytest.raises(ValueError, match=r"placeholder\(s\) for \d image\(s\)"):
            adapter.loglikelihood([lmms_request("loglikelihood", context, " red", doc_id)])
    # no placeholder: the images first; one per image: where the task put them
    for context, doc_id in [("compare", 1), ("<image> and <image>: compare", 1), ("what?", 0)]:
        assert isinstance(adapter.generate_until([lmms_request("generate_until", context, settings, doc_id)])[0], str)


def test_loglikelihood_splits_context_and_continuation_at_the_token_boundary(adapter):
    def loss(context, continuation):
        return adapter.loglikelihood([lmms_request("loglikelihood", context, continuation)])[0][0]

    # a context ending in a space: the space goes with the continuation, as lm-evaluation-harness does
    assert loss("Question: what color? Answer: ", "red") == loss("Question: what color? Answer:", " red")
    # a continuation finishing the context's last word: the word is one token ("▁cat") in what the model reads
    tokenizer = adapter.processor.tokenizer
    assert tokenizer.tokenize("a ca") == ["▁a", "▁c", "a"] and tokenizer.tokenize("a cat") == ["▁a", "▁cat"]
    assert loss("a ca", "t") == loss("a", " cat")
    with pytest.raises(ValueError, match="adds no token"):
        loss("Question: what color? Answer:", "")


def test_the_adapter_loads_what_every_lavit_command_loads(pipeline_folder, lavit_model, lavit_processor):
    """A LaVITPipeline folder (what `convert-original` writes) and its `language_model/` load as the model folder does:
    the adapter goes through the commands' resolver."""
    from lavit.evaluation.lmms_eval_model import LaVITLmms

    for folder in (pipeline_folder, pipeline_folder / "language_model"):
        adapter = LaVITLmms(pretrained=str(folder), device="cpu")
        assert torch.equal(adapter.model.lm_head.weight, lavit_model.lm_head.weight)
        assert adapter.processor.tokenizer.get_vocab() == lavit_processor.tokenizer.get_vocab()
