"""Shared fixtures: a CLIP tokenizer folder, a test-preset kit, a tiny demo dataset (jsonl and packed)."""

import gc
import os
import subprocess
import sys

import pytest

from tests.helpers.common import ROOT


@pytest.fixture(autouse=True)
def _shut_down_dataloader_workers():
    """paddle's multi-process DataLoader iterators sit in reference cycles (their reader thread refers to
    them), so an abandoned one is shut down only when the cyclic garbage collector reaches it. Collect
    right after each test, while its workers are fresh, rather than at a random point of a later test
    (where paddle's unbounded join hung once in CI)."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A CLIP BPE tokenizer learned from the demo captions (no model)."""
    from sd.data.demo_data import all_prompts
    from sd.kit.tokenizer import learn_bpe, save_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(str(folder), learn_bpe(p[3] for p in all_prompts()), model_max_length=16)
    return str(folder)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from paddlenlp.transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_kit(tmp_path_factory):
    """Path of a kit built once per session with the test preset (seconds): real layout and loaders,
    barely trained (its figures do not meet the default kit's targets); model_max_length 16."""
    from sd.kit.build import KitConfig, build_kit

    folder = tmp_path_factory.mktemp("kit") / "tiny-sd"
    build_kit(str(folder), KitConfig.test_preset(), seed=0, log=lambda *a: None)
    return str(folder)


@pytest.fixture(scope="session")
def demo_jsonl(tmp_path_factory):
    """A 72-image demo dataset at 32 px (each of the 36 prompts twice): path of its demo.jsonl."""
    from sd.data.demo_data import write_demo_jsonl

    return write_demo_jsonl(str(tmp_path_factory.mktemp("demo_jsonl")), num_images=72, size=32, seed=1)


@pytest.fixture(scope="session")
def demo_file_list(tmp_path_factory):
    """A 72-image demo dataset at 32 px, packed by create_pretraining_data.py into 3 part files."""
    from sd.data.demo_data import write_demo_jsonl

    folder = tmp_path_factory.mktemp("demo")
    write_demo_jsonl(str(folder / "raw"), num_images=72, size=32, seed=1)
    subprocess.run([sys.executable, os.path.join(ROOT, "create_pretraining_data.py"), "--input_path", "raw/demo.jsonl",
                    "--output_path", "data", "--per_part_file_num", "24", "--num_workers", "1"],
                   cwd=folder, check=True, capture_output=True)
    return str(folder / "data" / "filelist" / "custom_dataset.filelist.list")
