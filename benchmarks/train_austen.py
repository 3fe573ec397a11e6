"""A small Llama trained in fp32 on Jane Austen's novels: a full-precision model for quality work.

    python benchmarks/train_austen.py [DATA_DIR] [--tiny] [--threads 2]

The default model's weights sit on a Q4_1 grid (they come from a Q4_1 GGUF), which flatters every
4-bit format; this model's weights are trained here in fp32 and lie on no quantization grid.

* Text: every ``*.txt`` in ``DATA_DIR`` (default ``../shared/data/text`` relative to the repository)
  except the held-out novel (``northanger_abbey.txt``), which is never trained on: its text gives
  ``heldout.txt`` (the evaluation text the benchmarks use) and the held-out perplexity below.
  ``calib.txt`` is a slice of the training text, for a build's calibration.
* Tokenizer: a byte-level BPE (GPT-2's pre-tokenizer regex, ``tokenizers``), trained on the
  training novels, saved as a Hugging Face fast tokenizer with ``<|endoftext|>`` as BOS and EOS.
  llama.cpp's converter knows BPE pre-tokenizers by a hash of their output, which an own vocabulary
  never matches; ``benchmarks/llamacpp.py`` runs the converter with a plain byte-level BPE declared
  as ``gpt-2`` (the same regex).
* Model: ``LlamaForCausalLM`` (see ``FULL``), untied embedding and lm_head, trained from a fixed
  seed with AdamW on random 512-token windows, then saved (safetensors, fp32) with
  ``save_pretrained`` into ``<edgepipe cache>/bench/austen-<config hash>/``, with ``train.json``
  (the config, loss curve, held-out and unigram perplexity, wall time). A second call returns the
  cached folder. ``--tiny`` trains a seconds-long variant (the slow test's).

From Python: ``from benchmarks.train_austen import austen_model; path = austen_model()``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

Progress = Callable[[str], None]

HELDOUT = "northanger_abbey.txt"
SPECIAL = "<|endoftext|>"
EVAL_CHARS = 90_000  # heldout.txt: the held-out novel's opening, ~40 chunks of 512 tokens
CALIB_CHARS = 24_000  # calib.txt: a slice of the training text (the size the packaged calib.txt had until it grew to 120k)


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 8192
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    intermediate_size: int = 1536  # 3x hidden; 512 and 1536 are multiples of llama.cpp's k-quant block (256)
    tie_word_embeddings: bool = False
    seq_len: int = 512  # llama-perplexity -c 512 scores positions 256..510: train at that length
    # the token budget is what 2 shared cores train in ~45 min: this 35.7M-parameter model trained at
    # 200-235 tok/s on an idle machine (2 torch threads, batch 4 x 512, nice 15, load 0.2-2.4) but at
    # 96-108 tok/s beside other jobs (load 9-12, 2026-12-07), where one epoch (541k tokens) would take
    # 85 min: half an epoch, in batches of 2 x 512 for 256 updates (more updates for the same tokens).
    # Measured: 50 min (88 tok/s on average, load 5-13), held-out perplexity 304 vs unigram 829.
    batch_size: int = 2
    steps: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 16
    weight_decay: float = 0.1
    seed: int = 0
    eval_windows: int = 32  # held-out perplexity on this many 512-token windows of the held-out novel
    text_chars: int = 0  # train on each novel's first this many characters (0: all of it)
    version: int = 2  # bump when the recipe changes in a way the fields do not show

    def key(self, data_dir: Path) -> str:
        """A hash of the config and of the training files' names and sizes."""
        files = [(f.name, f.stat().st_size) for f in sorted(data_dir.glob("*.txt"))]
        blob = json.dumps({"config": asdict(self), "files": files}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


FULL = TrainConfig()
TINY = replace(
    FULL, vocab_size=1024, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    intermediate_size=384, seq_len=128, batch_size=8, steps=80, lr=8e-3, warmup_steps=8, eval_windows=8, text_chars=150_000,
)


def default_data_dir() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "text"


def bench_dir() -> Path:
    from edgepipe.models import cache_root

    return cache_root() / "bench"


def _split_texts(data_dir: Path, chars: int = 0) -> tuple[list[str], str]:
    """(training novels, held-out novel), read as UTF-8; ``chars``: each novel's opening only."""
    files = sorted(data_dir.glob("*.txt"))
    held = [f for f in files if f.name == HELDOUT]
    if not held or len(files) < 2:
        raise SystemExit(f"{data_dir}: expected {HELDOUT} and at least one other novel (*.txt)")
    train = [f.read_text(encoding="utf-8") for f in files if f.name != HELDOUT]
    held_text = held[0].read_text(encoding="utf-8")
    if chars:
        return [_cut(t, chars) for t in train], _cut(held_text, chars)
    return train, held_text


def _cut(text: str, chars: int) -> str:
    """The text's first ``chars`` characters, ended at a paragraph break."""
    if len(text) <= chars:
        return text
    end = text.rfind("\n\n", 0, chars)
    return text[: end if end > 0 else chars].rstrip() + "\n"


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE on ``texts``, as a transformers fast tokenizer (BOS = EOS = ``<|endoftext|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex, then bytes
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=None, model_max_length=2048
    )


def _ids(tokenizer: Any, texts: list[str]) -> Any:
    """All texts as one id tensor, each followed by EOS."""
    import torch

    out: list[int] = []
    for t in texts:
        for para in t.split("\n\n"):  # shorter pieces tokenize fast; the break itself is kept
            out.extend(tokenizer(para + "\n\n", add_special_tokens=False)["input_ids"])
        out.append(tokenizer.eos_token_id)
    return torch.tensor(out, dtype=torch.long)


def _model(cfg: TrainConfig, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    lcfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(lcfg).float()


def _lr(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _optimizer(cfg: TrainConfig, model: Any) -> Any:
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def train_model(cfg: TrainConfig, model: Any, ids: Any, progress: Progress) -> list[dict[str, float]]:
    """AdamW on random windows of ``ids`` (seeded); returns the logged loss curve."""
    import torch

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = _optimizer(cfg, model)
    model.train()
    curve: list[dict[str, float]] = []
    t0, acc = time.time(), 0.0
    every = max(1, cfg.steps // 18)
    for step in range(cfg.steps):
        starts = torch.randint(0, len(ids) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        x = torch.stack([ids[s : s + cfg.seq_len] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc += loss.item()
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            n = (step % every) + 1
            curve.append({"step": step + 1, "loss": acc / n, "seconds": round(time.time() - t0, 1)})
            tps = (step + 1) * cfg.batch_size * cfg.seq_len / (time.time() - t0)
            progress(f"step {step + 1}/{cfg.steps}: loss {acc / n:.3f}, lr {_lr(cfg, step):.2e}, {tps:.0f} tok/s")
            acc = 0.0
    model.eval()
    return curve


def heldout_perplexity(model: Any, ids: Any, seq_len: int, windows: int) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows of the held-out ids (every position but each window's first)."""
    import torch

    n = min(windows, len(ids) // seq_len)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            x = ids[w * seq_len : (w + 1) * seq_len].unsqueeze(0)
            loss = model(input_ids=x, labels=x).loss
            nll += float(loss) * (seq_len - 1)
            count += seq_len - 1
    return math.exp(nll / count), count


def unigram_perplexity(train_ids: Any, ids: Any, vocab: int, seq_len: int, windows: int) -> float:
    """The baseline: token frequencies of the training text (add-one), on the same held-out positions."""
    import torch

    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    n = min(windows, len(ids) // seq_len)
    tgt = torch.cat([ids[w * seq_len + 1 : (w + 1) * seq_len] for w in range(n)])
    return float(torch.exp(-logp[tgt].mean()))


def _train_into(tmp: Path, cfg: TrainConfig, data_dir: Path, threads: int, progress: Progress) -> dict[str, Any]:
    import torch

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(threads)
    t0 = time.time()
    train_texts, held = _split_texts(data_dir, cfg.text_chars)
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    train_ids, held_ids = _ids(tokenizer, train_texts), _ids(tokenizer, [held])
    progress(f"tokenizer: {len(tokenizer)} tokens; {len(train_ids)} training, {len(held_ids)} held-out tokens")
    model = _model(cfg, tokenizer)
    params = sum(p.numel() for p in model.parameters())
    progress(f"LlamaForCausalLM: {params / 1e6:.2f}M parameters, {cfg.steps * cfg.batch_size * cfg.seq_len} training tokens")
    curve = train_model(cfg, model, train_ids, progress)
    ppl, scored = heldout_perplexity(model, held_ids, cfg.seq_len, cfg.eval_windows)
    uni = unigram_perplexity(train_ids, held_ids, len(tokenizer), cfg.seq_len, cfg.eval_windows)
    progress(f"held-out ({HELDOUT}) perplexity {ppl:.2f} over {scored} tokens; unigram {uni:.1f}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "heldout.txt").write_text(_cut(held, EVAL_CHARS), encoding="utf-8")
    (tmp / "calib.txt").write_text(_cut(train_texts[0], CALIB_CHARS), encoding="utf-8")
    return {
        "config": asdict(cfg),
        "parameters": params,
        "training_files": sorted(f.name for f in data_dir.glob("*.txt") if f.name != HELDOUT),
        "heldout_file": HELDOUT,
        "training_tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "training_corpus_tokens": len(train_ids),
        "heldout_perplexity": ppl,
        "heldout_scored_tokens": scored,
        "unigram_perplexity": uni,
        "curve": curve,
        "threads": threads,
        "seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "loadavg_end": os.getloadavg(),
    }


def austen_model(
    data_dir: Path | None = None, tiny: bool = False, threads: int = 2, progress: Progress | None = None
) -> Path:
    """The cached trained folder (trained first if absent; a second caller waits for the first)."""
    say = progress or (lambda _m: None)
    data_dir = Path(data_dir or default_data_dir()).resolve()
    cfg = TINY if tiny else FULL
    out = bench_dir() / f"austen{'-tiny' if tiny else ''}-{cfg.key(data_dir)}"
    if (out / ".complete").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / ".complete").is_file():
            return out
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        say(f"training the Austen model ({'tiny' if tiny else 'full'}) into {out}")
        facts = _train_into(tmp, cfg, data_dir, threads, say)
        (tmp / "train.json").write_text(json.dumps(facts, indent=2))
        (tmp / ".complete").write_text("")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", nargs="?", type=Path, help=f"folder of novels (default {default_data_dir()})")
    p.add_argument("--tiny", action="store_true", help="a seconds-long variant (2 layers, 40 steps) for tests")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)
    t0 = time.time()
    out = austen_model(args.data_dir, tiny=args.tiny, threads=args.threads, progress=lambda m: print(m, file=sys.stderr, flush=True))
    facts = json.loads((out / "train.json").read_text())
    keys = ("parameters", "training_tokens_seen", "heldout_perplexity", "unigram_perplexity", "seconds")
    print(json.dumps({"model": str(out), **{k: facts[k] for k in keys}, "this_call_seconds": round(time.time() - t0, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
