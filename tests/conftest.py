"""Shared fixtures of the pipeline tests: a tiny tokenizer and tiny models of the four tested
architectures, made offline once per session, and the artifacts built from them.

- The stage cache (``EDGEPIPE_CACHE``) points at a session temp dir (``pytest_configure``), so no
  test reads or writes ``~/.cache/edgepipe`` and every test shares the exports. Set
  ``EDGEPIPE_TEST_CACHE=DIR`` to keep that cache between sessions (e.g. the converted default model).
- The tokenizer is a byte-level BPE (384 tokens) trained on the packaged ``edgepipe/data/calib.txt``.
- Each model (hidden 64, 2 layers, 4 heads / 2 kv heads, intermediate 160) is seeded and then trained
  for a few dozen Adam steps on the same text, so its next-token distributions are peaked like a real
  LM's: top-1 agreement and perplexity then mean something (a random-init model's are near uniform).
  Llama and Granite tie embeddings (as the default model does); Qwen2 and Phi3 do not.
- Everything heavy is memoized in :class:`TinyZoo` and built on first use, so a test run that
  selects a few tests exports only what they need.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ARCHS = ("llama", "granite", "qwen2", "phi3")
TIED = {"llama": True, "granite": True, "qwen2": False, "phi3": False}
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 160, 2, 4, 2
VOCAB = 384
# NB: keep 2 * INTERMEDIATE != VOCAB. onnxruntime-genai 0.18's builder takes any Linear whose
# out_features equals the vocabulary size for the lm_head; Phi3's fused gate_up_proj then becomes
# the "lm_head" and the export is silently wrong (logits from layer 0).
assert 2 * INTERMEDIATE != VOCAB
TRAIN_STEPS = 60
# Profiles only the tests use, passed to build by path under these names (the artifact's folder name):
# "int8-rtn" is int8 block 32 rounded everywhere, no calibration or sensitivity pass, the cheapest build
# (x86-avx512 itself allocates int8 formats by Fisher sensitivity and GPTQs them).
TEST_PROFILES = {"int8-rtn": Path(__file__).resolve().parent / "data" / "profiles" / "int8-rtn.yaml"}


def load_profile(target: str) -> Any:
    """The Target of a shipped profile's name or of one of :data:`TEST_PROFILES`."""
    from edgepipe.targets import load_target

    return load_target(str(TEST_PROFILES.get(target, target)))

_created_cache: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _created_cache
    keep = os.environ.get("EDGEPIPE_TEST_CACHE")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        os.environ["EDGEPIPE_CACHE"] = keep
    else:
        _created_cache = tempfile.mkdtemp(prefix="edgepipe-test-cache-")
        os.environ["EDGEPIPE_CACHE"] = _created_cache
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _created_cache:
        shutil.rmtree(_created_cache, ignore_errors=True)


def packaged_text(name: str) -> str:
    return resources.files("edgepipe.data").joinpath(name).read_text(encoding="utf-8")


# what the test zoo's tokenizer and tiny models train on: the calibration text's opening, the
# whole packaged calib.txt until it grew to 120k characters (the zoo stays as it was)
ZOO_TEXT_CHARS = 21_516


def zoo_text() -> str:
    return packaged_text("calib.txt")[:ZOO_TEXT_CHARS]


def make_tokenizer(out: Path) -> Path:
    """A byte-level BPE trained offline on the packaged calibration text, saved as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|bos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([zoo_text()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|endoftext|>")
    assert len(fast) == VOCAB
    fast.save_pretrained(str(out))
    return out


def model_config(arch: str, vocab: int, bos: int, eos: int):
    from transformers import GraniteConfig, LlamaConfig, Phi3Config, Qwen2Config

    common = dict(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=1024,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=TIED[arch],
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "granite":
        return GraniteConfig(
            **common, embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0
        )
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "phi3":
        # short rope only: original == max position embeddings (the builder's Phi3MiniModel)
        return Phi3Config(**common, original_max_position_embeddings=1024)
    raise ValueError(arch)


def make_model(arch: str, tokenizer_dir: Path, out: Path, *, steps: int = TRAIN_STEPS, seed: int = 0) -> Path:
    """Seeded tiny model of ``arch``, trained ``steps`` Adam steps on calib.txt, saved with its tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    return train_and_save(model_config(arch, len(tok), tok.bos_token_id, tok.eos_token_id), tokenizer_dir, out, steps=steps, seed=seed)


def train_and_save(cfg: Any, tokenizer_dir: Path, out: Path, *, steps: int = TRAIN_STEPS, seed: int = 0) -> Path:
    """A seeded model of the transformers config ``cfg``, trained ``steps`` Adam steps on calib.txt, saved with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and cheap on a shared 2-core machine
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        if steps:
            ids = torch.tensor(tok(zoo_text())["input_ids"])
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
            seq, batch = 64, 16
            model.train()
            for _ in range(steps):
                starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
                x = torch.stack([ids[int(s) : int(s) + seq] for s in starts])
                loss = model(input_ids=x, labels=x).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        model.save_pretrained(str(out))
    finally:
        torch.set_num_threads(threads)
    tok.save_pretrained(str(out))
    return out


def find_export(model_dir: Path) -> Path | None:
    """The fp32 export of ``model_dir`` in the stage cache (the folder the build's export stage wrote)."""
    from edgepipe.export import inspect_model
    from edgepipe.models import cache_root

    sha = inspect_model(model_dir).sha256
    for marker in sorted((cache_root() / "export").glob("*/.complete")):
        try:
            parts = json.loads(marker.read_text())["parts"]
        except (OSError, ValueError, KeyError):
            continue
        if parts.get("config", {}).get("fields", {}).get("source_sha256") == sha and (marker.parent / "model" / "model.onnx").is_file():
            return marker.parent / "model"
    return None


class TinyZoo:
    """Memoized tiny models, fp32 exports and built artifacts, under one session folder."""

    def __init__(self, root: Path):
        self.root = root
        self._memo: dict[Any, Any] = {}

    @property
    def tokenizer(self) -> Path:
        if "tok" not in self._memo:
            self._memo["tok"] = make_tokenizer(self.root / "tokenizer")
        return self._memo["tok"]

    def model(self, arch: str) -> Path:
        key = ("model", arch)
        if key not in self._memo:
            self._memo[key] = make_model(arch, self.tokenizer, self.root / f"tiny-{arch}")
        return self._memo[key]

    def artifact(self, arch: str, target: str) -> tuple[Path, Any]:
        """(artifact folder, BuildResult) of ``edgepipe.build.build`` for the tiny ``arch`` model; ``target``
        is a shipped profile's name or one of :data:`TEST_PROFILES`."""
        key = ("artifact", arch, target)
        if key not in self._memo:
            from edgepipe.pipeline import build

            out = self.root / "artifacts" / f"{arch}-{target}"
            res = build(target=str(TEST_PROFILES.get(target, target)), out=out, model=self.model(arch))
            self._memo[key] = (out, res)
        return self._memo[key]

    def fp32(self, arch: str) -> Path:
        """The fp32 export folder (model.onnx + genai_config.json + tokenizer), shared with the builds."""
        key = ("fp32", arch)
        if key not in self._memo:
            found = find_export(self.model(arch))
            if found is None:
                self.artifact(arch, "int8-rtn")  # the cheapest build; its export stage fills the cache
                found = find_export(self.model(arch))
            assert found is not None, "the build's export stage left no fp32 export in the stage cache"
            self._memo[key] = found
        return self._memo[key]

    def torch_model(self, arch: str):
        key = ("torch", arch)
        if key not in self._memo:
            import torch
            from transformers import AutoModelForCausalLM

            self._memo[key] = AutoModelForCausalLM.from_pretrained(str(self.model(arch)), dtype=torch.float32).eval()
        return self._memo[key]

    def eval_ids(self, n: int, offset: int = 0) -> np.ndarray:
        """``n`` token ids of the packaged eval text (not the text the models were trained on)."""
        from tokenizers import Tokenizer

        if "eval_ids" not in self._memo:
            tok = Tokenizer.from_file(str(self.tokenizer / "tokenizer.json"))
            self._memo["eval_ids"] = np.asarray(tok.encode(packaged_text("eval.txt")).ids, dtype=np.int64)
        return self._memo["eval_ids"][offset : offset + n]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> TinyZoo:
    return TinyZoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def tiny_tokenizer(zoo: TinyZoo) -> Path:
    return zoo.tokenizer


@pytest.fixture(scope="session")
def tiny_llama(zoo: TinyZoo) -> Path:
    return zoo.model("llama")


@pytest.fixture(scope="session")
def llama_artifact(zoo: TinyZoo) -> Path:
    """The tiny tied Llama built for x86-avx2 (GPTQ, formats chosen per matrix within 6.12 bits/weight, int4
    tied embedding); budgets hold."""
    return zoo.artifact("llama", "x86-avx2")[0]


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param
