"""The dataset phase as plain functions: splitting, packing, statistics, and arbitrary rows."""

from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from codelupe_trainer.data.dataset import build_dataset, is_eval_sample
from codelupe_trainer.data.packing import IGNORE_INDEX, Block, TokenizedSample, pack_best_fit
from codelupe_trainer.data.filters import build_blockers
from codelupe_trainer.config import DataSettings
from codelupe_trainer.data.records import Sample


class CharTokenizer:
    """One token per character (ids 1..255), EOS 0: enough to test packing arithmetic exactly."""

    eos_token_id = 0

    def __call__(self, texts, **kwargs):
        return {"input_ids": [[min(ord(char), 255) or 1 for char in text] for text in texts]}


def sequence(sample_id: int, length: int) -> TokenizedSample:
    return TokenizedSample.of(sample_id, list(range(1, length + 1)))


@pytest.mark.parametrize(
    ("lengths", "max_length", "expected_blocks"),
    [
        ([10, 10, 10], 30, 1),
        ([20, 15, 10, 5], 25, 2),   # 20+5, 15+10
        ([25, 25], 25, 2),
        ([7] * 10, 16, 5),
    ],
)
def test_best_fit_packs_every_token_into_few_blocks(lengths, max_length, expected_blocks):
    blocks = pack_best_fit([sequence(index, length) for index, length in enumerate(lengths)], max_length)
    assert len(blocks) == expected_blocks
    assert sum(len(block) for block in blocks) == sum(lengths)
    assert all(len(block) <= max_length for block in blocks)


def test_block_positions_restart_and_boundaries_carry_no_label():
    block = Block()
    block.add(sequence(1, 3))
    block.add(sequence(2, 2))
    assert block.position_ids.tolist() == [0, 1, 2, 0, 1]
    assert block.labels.tolist() == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 2]


def test_split_is_stable_by_id_and_near_the_fraction():
    flags = [is_eval_sample(sample_id, seed=7, eval_fraction=0.1) for sample_id in range(20_000)]
    assert flags == [is_eval_sample(sample_id, seed=7, eval_fraction=0.1) for sample_id in range(20_000)]
    assert 0.09 < sum(flags) / len(flags) < 0.11
    assert not any(is_eval_sample(sample_id, seed=7, eval_fraction=0.0) for sample_id in range(100))


def test_long_samples_are_split_not_dropped():
    built = build_dataset([Sample(1, "x" * 100, "python", 80)], CharTokenizer(), max_length=32, eval_fraction=0.0, seed=0)
    formatted_length = len("<|lang:python|>\n") + 100 + 1
    assert built.dataset_metrics["dataset/max_tokens"] == built.dataset_metrics["dataset/min_tokens"] == formatted_length
    assert sum(len(block) for block in built.train_blocks) == formatted_length


def test_statistics_come_from_the_one_tokenization():
    samples = [Sample(index, "a" * (10 * index + 50), "python" if index % 2 else "go", 70 + index) for index in range(1, 9)]
    built = build_dataset(samples, CharTokenizer(), max_length=256, eval_fraction=0.0, seed=0)
    longest_header = len("<|lang:go|>\n") + 1  # sample 8 is the longest, and even ids are "go"
    assert built.dataset_metrics["dataset/max_tokens"] == 10 * 8 + 50 + longest_header
    assert built.data_metrics["data/language_go"] == 4
    assert built.data_metrics["data/language_python_percent"] == 50.0
    assert built.data_metrics["data/avg_quality_score"] == pytest.approx(74.5)
    assert built.dataset_metrics["dataset/real_token_fraction"] == pytest.approx(
        built.dataset_metrics["dataset/avg_tokens_per_sample"] * 8 / (256 * len(built.train_blocks)))


rows = st.builds(
    Sample,
    id=st.integers(min_value=1, max_value=10**9),
    content=st.text(min_size=0, max_size=400),
    language=st.sampled_from(["python", "go", "", "ünïcode", "x" * 50]),
    quality=st.integers(min_value=-5, max_value=200),
)


@hypothesis_settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(rows, max_size=30, unique_by=lambda sample: sample.id))
def test_arbitrary_rows_never_raise_and_every_row_is_accounted_for(samples):
    blockers, _ = build_blockers(DataSettings(), None)
    built = build_dataset(samples, CharTokenizer(), max_length=64, eval_fraction=0.2, seed=1, blockers=blockers)
    blocked = built.data_metrics["data/blocked_total"]
    assert built.total_samples + blocked == len(samples)
    assert set(built.sample_ids) <= {sample.id for sample in samples}
    for block in built.train_blocks + built.eval_blocks:
        assert len(block) <= 64
        assert len(block.input_ids) == len(block.labels) == len(block.position_ids)


def test_packed_samples_do_not_attend_to_each_other(tiny_model):
    """The logits of a sample packed after another equal those of the same sample alone."""
    from transformers import AutoModelForCausalLM

    from codelupe_trainer.data.collate import PackedCollator

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    model.config.use_cache = False
    first, second = sequence(1, 40), TokenizedSample.of(2, [5, 9, 13, 200, 77, 31, 8, 2, 99, 14])
    block = Block()
    block.add(first)
    block.add(second)
    alone = Block()
    alone.add(second)
    collate = PackedCollator(pad_token_id=0)
    with torch.no_grad():
        packed_logits = model(**{k: v for k, v in collate([block]).items() if k != "labels"}).logits[0, 40:]
        alone_logits = model(**{k: v for k, v in collate([alone]).items() if k != "labels"}).logits[0]
        leaked = model(input_ids=torch.tensor(block.input_ids[None], dtype=torch.long)).logits[0, 40:]
    assert torch.allclose(packed_logits, alone_logits, atol=1e-5)
    assert not torch.allclose(leaked, alone_logits, atol=1e-3), "control: without restarting positions they differ"


def test_completion_format_puts_no_loss_on_the_prompt(tiny_model):
    from transformers import AutoTokenizer

    from codelupe_trainer.data.dataset import make_completion_formatter

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    content = "".join(f"def step_{index}(x):\n    return x + {index}\n" for index in range(10))
    sample = Sample(42, content, "python", 80)
    formatter = make_completion_formatter(tokenizer)
    pieces, completion = formatter(sample)
    prompt = "".join(pieces)
    assert prompt.startswith("<|im_start|>user\nContinue this python code:\n") and prompt.endswith("<|im_start|>assistant\n")
    assert content.startswith(prompt.split("code:\n", 1)[1].split("<|im_end|>")[0]) and content.endswith(completion)

    built = build_dataset([sample], tokenizer, max_length=1024, eval_fraction=0.0, seed=0, format_text=formatter)
    [block] = built.train_blocks
    prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert all(label == IGNORE_INDEX for label in block.labels[:prompt_length])
    assert block.labels[prompt_length:].tolist() == block.input_ids[prompt_length:].tolist()
    assert tokenizer.decode(block.input_ids[prompt_length:-1].tolist()) == completion


def test_control_token_text_in_code_trains_as_text_never_as_the_control_token(tiny_model):
    """Code that holds "<|endoftext|>" or "<|im_start|>" as text (tokenizer code, model servers) is tokenized
    as that text: the only end-of-text id is the one after each sample, and in the completion format the
    only chat markers are the template's own. Read as control tokens, the model would learn to end a file
    in the middle of a string."""
    from transformers import AutoTokenizer

    from codelupe_trainer.data.dataset import make_completion_formatter

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    eos, im_start, im_end = (tokenizer.convert_tokens_to_ids(token) for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    content = ('STOP = "<|endoftext|>"\nSTART = "<|im_start|>"\nEND = "<|im_end|>"\n'
               + "".join(f"def step_{index}(x):\n    return x + {index}\n" for index in range(6)))
    sample = Sample(7, content, "python", 80)

    raw = build_dataset([sample], tokenizer, max_length=1024, eval_fraction=0.0, seed=0)
    [block] = raw.train_blocks
    ids = block.input_ids.tolist()
    assert ids.count(eos) == 1 and ids[-1] == eos, "one end-of-text, after the sample"
    assert im_start not in ids and im_end not in ids
    assert tokenizer.decode(ids[:-1]) == f"<|lang:python|>\n{content}"

    completion = build_dataset([sample], tokenizer, max_length=1024, eval_fraction=0.0, seed=0,
                               format_text=make_completion_formatter(tokenizer))
    [block] = completion.train_blocks
    ids = block.input_ids.tolist()
    # The template's markers: <|im_start|>user ... <|im_end|> <|im_start|>assistant; the code's are text.
    assert ids.count(im_start) == 2 and ids.count(im_end) == 1 and ids.count(eos) == 1 and ids[-1] == eos
    assert ids[0] == im_start
    assert tokenizer.decode(ids[:-1]).replace("<|im_start|>user\nContinue this python code:\n", "", 1) \
        .replace("<|im_end|>\n<|im_start|>assistant\n", "", 1) == content


def test_the_completion_format_with_a_model_that_has_no_chat_template_is_one_clear_error(tiny_model):
    from transformers import AutoTokenizer

    from codelupe_trainer.data.dataset import make_completion_formatter
    from codelupe_trainer.errors import TrainingError

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = None  # a base model's tokenizer
    with pytest.raises(TrainingError, match=r"data.format = 'completion' needs the model's chat template.*'raw'"):
        make_completion_formatter(tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"  # rewrites the message
    with pytest.raises(TrainingError, match="does not show the user message as written"):
        make_completion_formatter(tokenizer)


@pytest.mark.parametrize(
    ("content", "language", "expected"),
    [
        ('def f(x):\n    """Doc."""\n    # note\n    if x:\n        return 1\n    return 2\n', "python",
         {"code/avg_lines": 6, "code/comments_percent": 100 / 6, "code/docstrings_percent": 100, "code/avg_complexity": 2}),
        ("// add\nfunc add(a, b int) int {\n\tif a > 0 && b > 0 {\n\t\treturn a + b\n\t}\n\treturn 0\n}\n", "go",
         {"code/avg_lines": 7, "code/comments_percent": 100 / 7, "code/docstrings_percent": 0, "code/avg_complexity": 3}),
    ],
)
def test_code_metrics(content, language, expected):
    from codelupe_trainer.data.codestats import measure_code, summarize_code

    assert summarize_code([measure_code(content, language)]) == pytest.approx(expected)


def test_online_packer_keeps_a_bounded_working_set_and_packs_densely():
    import random

    from codelupe_trainer.data.packing import Packer

    generator = random.Random(3)
    packer = Packer(max_length=512, max_open=16)
    lengths = [generator.randint(20, 400) for _ in range(3000)]
    for index, length in enumerate(lengths):
        packer.add(sequence(index, length))
        assert len(packer._free_space) <= 16
    blocks = packer.finish()
    assert sum(len(block) for block in blocks) == sum(lengths)
    assert sum(lengths) / (512 * len(blocks)) > 0.95
    assert all(block._pieces == [] for block in blocks), "sealed blocks keep arrays only"


def test_fast_path_tokenizes_exactly_like_the_transformers_call(tiny_model):
    from transformers import AutoTokenizer

    from codelupe_trainer.data.dataset import _encode

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["def f(x):\n    return x  # ünïcode\n", "<|im_start|>user\nhi<|im_end|>\n", "\t\n  "]
    # Markup (the chat template's pieces) as the transformers call reads it; code with special tokens as text.
    assert _encode(tokenizer, texts, markup=True) == tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert _encode(tokenizer, texts, markup=False) == tokenizer(texts, add_special_tokens=False,
                                                               split_special_tokens=True)["input_ids"]
    assert _encode(tokenizer, texts, markup=False) != _encode(tokenizer, texts, markup=True), "control: they differ"


def test_one_sample_per_block_undoes_packing():
    from codelupe_trainer.data.packing import one_sample_per_block

    block = Block()
    block.add(sequence(1, 3))
    block.add(TokenizedSample.of(2, [7, 8, 9, 10], prompt_length=2))
    block.seal()
    first, second = one_sample_per_block([block])
    assert first.input_ids.tolist() == [1, 2, 3] and first.labels.tolist() == [IGNORE_INDEX, 2, 3]
    assert second.input_ids.tolist() == [7, 8, 9, 10] and second.labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 9, 10]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packing_probe_finds_isolation_on_real_backends(tiny_model, attention):
    from transformers import AutoModelForCausalLM

    from codelupe_trainer.training.model import packing_is_isolated

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention)
    model.config.use_cache = False
    assert packing_is_isolated(model)
    # With a KV cache in play the packed layout is not detected: the probe must notice the leak.
    model.config.use_cache = True
    assert not packing_is_isolated(model)


def test_the_evaluation_split_is_capped_and_the_rest_of_its_share_trains():
    from codelupe_trainer.data.dataset import within_block_budget
    from codelupe_trainer.data.records import FetchResult

    samples = [Sample(index, "b" * 40, "python", 80) for index in range(1, 41)]
    eval_share = sum(is_eval_sample(sample.id, 0, 0.5) for sample in samples)
    assert eval_share > 5  # the cap below bites
    built = build_dataset(samples, CharTokenizer(), max_length=64, eval_fraction=0.5, seed=0, max_eval_samples=5)
    assert built.eval_samples == 5 and built.train_samples == 35
    assert len(built.eval_blocks) == 5 and len(built.train_blocks) == 35  # one 57-token sample a block
    # The step budget's shadow packer applies the same cap: it lets through exactly what 35 blocks hold.
    fetched = FetchResult(last_examined_id=40)
    taken = list(within_block_budget(samples, 20, CharTokenizer(), 64, lambda sample: ("", sample.content), 0.5, 0,
                                     fetched, max_eval_samples=5))
    capped = build_dataset(taken, CharTokenizer(), max_length=64, eval_fraction=0.5, seed=0, max_eval_samples=5)
    assert len(capped.train_blocks) == 20 and fetched.last_examined_id == taken[-1].id
