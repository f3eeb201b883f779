"""`lavit.training.finetune`: the held-out evaluation a fine-tuning run hands its trainer (rows built like the
training rows with their dropped records counted once, and for captions and VQA a generated-answer evaluator with
the run's batch size and sample cap) and the parser of `lavit finetune`."""

import datasets
import pytest
from conftest import text_vocab_size, tiny_lavit_config
from lavit.training.collators import lm_collator
from lavit.training.data import BadRecordCounter
from lavit.training.evaluation import GenerationEvaluator
from lavit.training.finetune import held_out_evaluation, make_parser
from lavit.training.sequences import InstructionBuilder


def parts(lavit_processor, task):
    builder = InstructionBuilder(lavit_processor, task, max_length=64)
    config = tiny_lavit_config(text_vocab_size(lavit_processor.tokenizer))
    return builder, lm_collator(lavit_processor, config, packed=True)


def arguments(tmp_path, task, *extra):
    return make_parser().parse_args_and_config(
        ["--model", "org/name", "--data", "train.jsonl", "--task", task, "--output_dir", str(tmp_path), *extra])


def test_without_held_out_records_there_is_no_evaluation(lavit_processor, tmp_path):
    builder, collator = parts(lavit_processor, "caption")
    script, training = arguments(tmp_path, "caption")
    assert held_out_evaluation(None, BadRecordCounter(), builder, collator, script, training) is None


def test_vqa_held_out_rows_count_their_dropped_records_once_and_get_a_generating_evaluator(lavit_processor,
                                                                                            tmp_path):
    builder, collator = parts(lavit_processor, "vqa")
    script, training = arguments(tmp_path, "vqa", "--eval_data", "held_out.jsonl", "--eval_max_samples", "7",
                                 "--per_device_eval_batch_size", "3")
    held_out = datasets.Dataset.from_list([{"image": "a.png", "question": "what?", "answer": "a cat"},
                                           {"image": "b.png", "question": "what?", "answer": " "}])
    counter = BadRecordCounter()
    evaluation = held_out_evaluation(held_out, counter, builder, collator, script, training)
    assert len(evaluation["eval_dataset"]) == 1 and evaluation["eval_skip_counter"] is counter
    assert counter.total == 1 and collator.count_stored_skips is False  # not counted again per batch
    evaluator = evaluation["evaluator"]
    assert isinstance(evaluator, GenerationEvaluator) and evaluator.records is held_out
    assert (evaluator.task, evaluator.batch_size, evaluator.max_samples) == ("vqa", 3, 7)
    assert evaluation["eval_data_name"] == "held_out.jsonl"


def test_chat_is_evaluated_by_its_loss_alone_and_named_after_the_training_data(lavit_processor, tmp_path):
    builder, collator = parts(lavit_processor, "chat")
    script, training = arguments(tmp_path, "chat", "--eval_split_size", "0.2")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}]
    held_out = datasets.Dataset.from_list([{"messages": messages, "images": ["a.png"]}])
    evaluation = held_out_evaluation(held_out, BadRecordCounter(), builder, collator, script, training)
    assert evaluation["evaluator"] is None and len(evaluation["eval_dataset"]) == 1
    assert evaluation["eval_data_name"] == "train.jsonl"


def test_the_parser_gives_finetuning_and_trainer_arguments(tmp_path):
    script, training = arguments(tmp_path, "vqa", "--lora", "--lora_r", "4", "--learning_rate", "0.01")
    assert (script.task, script.lora, script.lora_r, script.merge_lora) == ("vqa", True, 4, True)
    assert training.learning_rate == 0.01 and training.output_dir == str(tmp_path)


def test_the_parser_refuses_an_unknown_task_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        arguments(tmp_path, "translate")
    assert exit_info.value.code == 2 and "--task" in capsys.readouterr().err
