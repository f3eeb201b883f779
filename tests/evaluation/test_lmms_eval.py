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
    with pytest.raises(ValueError, match="unknown model_args"):
        LaVITLmms(pretrained=str(model_folder), device="cpu", temperature=1)
