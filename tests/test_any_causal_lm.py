"""Any causal LM a user brings: the preflight's routing (from config.json alone, fast), the config
normalisation for the builder, the generic torch.onnx export (its fp32 logits vs PyTorch's), and
per-architecture builds that `edgepipe run` generates from (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgepipe.cli import main
from edgepipe.errors import ModelError
from edgepipe.export.preflight import BUILDER, GENERIC, REFUSED, preflight, preflight_config

VOCAB = 384  # the shared tiny tokenizer's (tests/conftest.py)

# model_type, tiny config fields, the path the preflight must choose (and a word of its reason)
MODELS: dict[str, tuple[str, dict, str, str]] = {
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512), GENERIC, "no GPT2LMHeadModel path"),
    "gptj": ("gptj", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, rotary_dim=8), GENERIC, "no GPTJForCausalLM"),
    "neox": ("gpt_neox", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              max_position_embeddings=512), GENERIC, "no GPTNeoXForCausalLM"),
    "opt": ("opt", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, max_position_embeddings=512,
                        word_embed_proj_dim=64), GENERIC, "no OPTForCausalLM"),
    "gemma3": ("gemma3_text", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                   intermediate_size=128, max_position_embeddings=512, sliding_window=8), GENERIC, "sliding window 8"),
    "gptoss": ("gpt_oss", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               intermediate_size=64, max_position_embeddings=512, num_local_experts=4, num_experts_per_tok=2,
                               sliding_window=8), GENERIC, "no GptOssForCausalLM"),
    # head size 24: GroupQueryAttention refuses it at run time
    "llama24": ("llama", dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                              max_position_embeddings=512), GENERIC, "head size 24"),
    # 2 x intermediate == vocabulary: the builder would take the fused gate_up_proj for the lm_head
    "phi3": ("phi3", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=VOCAB // 2,
                          max_position_embeddings=512, original_max_position_embeddings=512), GENERIC, "gate_up"),
}


def tiny_config(kind: str):
    from transformers import AutoConfig

    model_type, fields, _, _ = MODELS[kind]
    return AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=1, eos_token_id=0, pad_token_id=0, **fields)


def config_folder(kind: str, root: Path) -> Path:
    """A folder with config.json only (what the preflight reads), as transformers saves it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = root / kind
    cfg = tiny_config(kind)
    cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg.model_type]]  # save_pretrained of a model writes it
    cfg.save_pretrained(str(out))
    return out


_MODELS: dict[str, Path] = {}


def tiny_model(kind: str, zoo) -> Path:
    """The tiny model of ``kind`` with the shared tokenizer, trained a little (peaked next-token distributions)."""
    from conftest import train_and_save

    if kind not in _MODELS:
        _MODELS[kind] = train_and_save(tiny_config(kind), zoo.tokenizer, zoo.root / f"any-{kind}", steps=20)
    return _MODELS[kind]


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_preflight_routes_each_architecture(kind, tmp_path):
    pre = preflight(config_folder(kind, tmp_path))
    _, _, path, why = MODELS[kind]
    assert pre.path == path, pre.reason
    assert why in pre.reason
    assert pre.vocab == VOCAB and pre.layers == 2


def test_preflight_facts(tmp_path):
    pre = preflight(config_folder("llama24", tmp_path))
    assert (pre.head_size, pre.heads, pre.kv_heads, pre.rope_type, pre.tied) == (24, 4, 2, "default", False)
    assert pre.layout.startswith("GQA")
    oss = preflight(config_folder("gptoss", tmp_path))
    assert (oss.experts, oss.experts_per_token, oss.sliding_window) == (4, 2, 8)
    gemma = preflight(config_folder("gemma3", tmp_path))
    assert "per layer type" in (gemma.rope_type or "") and gemma.rule == "sliding-window-cache"
    no_window = json.loads((tmp_path / "gemma3" / "config.json").read_text())
    no_window["sliding_window"] = None
    builder = preflight_config(no_window)
    assert builder.path == BUILDER and builder.normalized == ("rope-per-layer-type",)


def test_inspect_json_and_text(tmp_path):
    folder = config_folder("phi3", tmp_path)
    res = cli("inspect", folder, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["path"] == GENERIC and data["rule"] == "vocab-wide-projection" and data["vocab"] == VOCAB
    text = cli("inspect", folder)
    assert text.exit_code == 0 and "export path: generic" in text.stdout


@pytest.mark.parametrize("config, words", [
    ({"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
      "vocab_size": 100}, "not a causal language model"),
    ({"architectures": ["FooForCausalLM"], "model_type": "foo-remote", "hidden_size": 64, "num_attention_heads": 4,
      "num_hidden_layers": 2, "vocab_size": 100}, "does not know model type"),
])
def test_refusals_are_one_line_exit_2(config, words, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert preflight_config(config).path == REFUSED
    res = cli("inspect", tmp_path)
    assert res.exit_code == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in res.output
    with pytest.raises(ModelError, match=words):
        preflight(tmp_path).raise_if_refused()


def test_normalised_copy_for_the_builder_leaves_the_user_folder_alone(tmp_path):
    from transformers import AutoConfig

    from edgepipe.export.normalize import normalized_folder

    folder = config_folder("gemma3", tmp_path / "src")
    (folder / "model.safetensors").write_bytes(b"weights")
    before = (folder / "config.json").read_text()
    out, rows = normalized_folder(folder, tmp_path / "work")
    assert rows == ["rope-per-layer-type"] and out != folder
    assert (folder / "config.json").read_text() == before
    assert (out / "model.safetensors").read_bytes() == b"weights"
    rp = json.loads((out / "config.json").read_text())["rope_parameters"]
    assert rp["rope_type"] == "default" and rp["rope_local_base_freq"] == 10000.0  # what the builder reads
    # transformers still sees the same per-layer-type rope parameters
    assert AutoConfig.from_pretrained(str(out)).rope_parameters["sliding_attention"] == \
        AutoConfig.from_pretrained(str(folder)).rope_parameters["sliding_attention"]
    same, none = normalized_folder(config_folder("llama24", tmp_path / "src"), tmp_path / "work2")
    assert none == [] and same == tmp_path / "src" / "llama24"


def test_estimate_gpt_oss_20b_says_it_does_not_fit_with_numbers():
    """gpt-oss-20b's published shape: 24 layers, 32 experts (4 per token), ~20.9B parameters."""
    from edgepipe.estimate import estimate
    from edgepipe.targets import load_target

    config = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880, "num_hidden_layers": 24,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2880, "vocab_size": 201088,
        "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128, "tie_word_embeddings": False,
        "max_position_embeddings": 131072,
    }
    pre = preflight_config(config)
    est = estimate(config, 20_914_757_184, load_target("raspberrypi5"), pre)
    assert not est["fits"] and est["peak_ram_mb"] > 8 * 1024 and est["artifact_mb"] > 4000
    assert est["decode_tok_s"] > 0


def test_estimate_tiny_gpt_oss_through_the_cli(zoo):
    res = cli("estimate", "--model", tiny_model("gptoss", zoo), "--target", "raspberrypi5", "--json")
    assert res.exit_code == 0, res.output
    est = json.loads(res.stdout)
    assert est["fits"] and est["artifact_mb"] > 0 and est["export_path"] == GENERIC


def test_generic_export_matches_pytorch_and_decodes_incrementally(zoo, tmp_path):
    """GPT-2 (no builder path): fp32 logits vs PyTorch within 1e-4; the runtime's concat-cache
    stepper gives the same logits as one whole-window pass."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgepipe.export.generic import export_generic
    from edgepipe.quantize import plan_from_onnx
    from edgepipe.quantize.configs import Rtn
    from edgepipe.runtime.model import CausalLM

    src = tiny_model("gpt2", zoo)
    info = export_generic(src, tmp_path / "model")
    assert info["max_abs_diff_vs_pytorch"] < 1e-4
    lm = CausalLM(tmp_path / "model")
    ids = zoo.eval_ids(24)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()(torch.tensor(ids)[None]).logits[0].numpy()
    whole = lm.logits(ids)
    assert np.abs(whole - ref).max() < 1e-4
    state = lm.stepper(len(ids))
    steps = np.concatenate([state.step(ids[:10]), *(state.step(ids[i: i + 1]) for i in range(10, len(ids)))])
    assert np.abs(steps - whole).max() < 1e-4
    # the quantizer sees every weight product, per layer, and the tied table
    plan = plan_from_onnx(tmp_path / "model" / "model.onnx", Rtn(bits=4, block_size=32))
    assert plan.num_layers == 2 and plan.tied and len(plan) == 2 * 4 + 1


def test_generic_untied_embedding_is_a_table_of_its_own(zoo, tmp_path):
    """GPT-J (untied, no builder path): its token embedding is ``model.embed_tokens.weight`` in the generic
    export, as the builder names it, and the plan lists it as a table of its own (a lookup), as the
    preflight's matrices do for ``estimate``; the quantized graph reads it with GatherBlockQuantized."""
    import onnx

    from edgepipe.export.generic import export_generic
    from edgepipe.export.preflight import generic_matrices
    from edgepipe.quantize.bitplan import EMBEDDING, Matrix, matrices_from_onnx
    from edgepipe.quantize.configs import Rtn
    from edgepipe.quantize.graph import quantize

    src = tiny_model("gptj", zoo)
    export_generic(src, tmp_path / "model")
    got = matrices_from_onnx(onnx.load(str(tmp_path / "model" / "model.onnx"), load_external_data=False))
    emb = Matrix(EMBEDDING, 64, VOCAB, lookup=True)
    assert not got.tied and [m for m in got.matrices if m.lookup] == [emb]
    planned = generic_matrices(preflight(src))
    assert [m for m in planned.matrices if m.lookup] == [emb] and not planned.tied
    info = quantize(tmp_path / "model", tmp_path / "q", Rtn(bits=4, block_size=32))
    assert info["embedding"].startswith("int4/b32/asym")
    q = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "GatherBlockQuantized" for n in q.graph.node) == 1
    from edgepipe.runtime.model import CausalLM

    ids = zoo.eval_ids(64)
    ref, got_logits = CausalLM(tmp_path / "model", threads=1).logits(ids), CausalLM(tmp_path / "q", threads=1).logits(ids)
    assert np.isfinite(got_logits).all() and (ref.argmax(-1) == got_logits.argmax(-1)).mean() > 0.6  # a working graph


def _fp32_matches_pytorch(artifact: Path, model_dir: Path, zoo) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    export = manifest["export"]
    if export["path"] == GENERIC:
        assert export["max_abs_diff_vs_pytorch"] < 1e-4
        return
    import torch
    from conftest import find_export
    from transformers import AutoModelForCausalLM

    from edgepipe.runtime.model import CausalLM

    ids = zoo.eval_ids(16)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()(torch.tensor(ids)[None]).logits[0].numpy()
    fp32 = find_export(model_dir)
    assert fp32 is not None
    assert np.abs(CausalLM(fp32).logits(ids) - ref).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_builds_and_generates(kind, zoo, tmp_path):
    """Each architecture builds for x86-avx2 (exit 0, or 3 when an accuracy budget fails on a tiny
    model), through the path the preflight chose; `edgepipe run` generates from the artifact."""
    src = tiny_model(kind, zoo)
    out = tmp_path / f"{kind}-x86-avx2"
    res = cli("build", "--model", src, "--target", "x86-avx2", "--out", out, "--json")
    assert res.exit_code in (0, 3), res.output[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export"]["path"] == MODELS[kind][2]
    _fp32_matches_pytorch(out, src, zoo)
    gen = cli("run", out, "--prompt", "It was", "--max-new-tokens", "8")
    assert gen.exit_code == 0, gen.output
    assert gen.stdout.startswith("It was")  # a 20-step tiny model may well continue with whitespace or stop at once


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama24"])
def test_builds_for_raspberrypi5(kind, zoo, tmp_path):
    out = tmp_path / f"{kind}-pi5"
    res = cli("build", "--model", tiny_model(kind, zoo), "--target", "raspberrypi5", "--out", out)
    assert res.exit_code in (0, 3), res.output[-2000:]
    assert cli("run", out, "--prompt", "It was", "--max-new-tokens", "4").exit_code == 0
