"""An untied input embedding is quantized (issue 12): its own GatherBlockQuantized table, a first-class
entry of the BitPlan (its own format choice, its bytes exactly as stored, its Fisher sensitivity), and
``estimate`` counting it from ``config.json``. A tied model's shared table is unchanged (tests/test_bitplan.py,
tests/test_quantized_models.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import HIDDEN, VOCAB, model_config, train_and_save

from edgepipe.estimate import artifact_size
from edgepipe.export import inspect_model
from edgepipe.quantize import plan_from_config, scheme_from_target
from edgepipe.quantize.allocate import options_for
from edgepipe.quantize.allocate_stage import built_plan
from edgepipe.quantize.bitplan import EMBEDDING, matrices_from_onnx
from edgepipe.quantize.configs import allowed_formats
from edgepipe.runtime.model import CausalLM
from edgepipe.targets import load_target

# measured (2026-12-07): the raspberrypi5 artifact vs its fp32 export on
# 2 x 256 eval tokens: KL 0.00049, top-1 0.957, PPL +0.003 %. The bounds leave 10x and a margin.
MAX_KL = 0.005
MIN_TOP1 = 0.9


@pytest.fixture(scope="module")
def untied(zoo) -> Path:
    """The tiny Llama of the zoo, untied: its own input embedding and lm_head (trained the same way)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(zoo.tokenizer))
    cfg = model_config("llama", len(tok), tok.bos_token_id, tok.eos_token_id)
    cfg.tie_word_embeddings = False
    out = zoo.root / "tiny-llama-untied"
    if not (out / "config.json").is_file():
        train_and_save(cfg, zoo.tokenizer, out)
    return out


@pytest.fixture(scope="module")
def built(untied, zoo):
    from edgepipe.pipeline import build

    out = zoo.root / "artifacts" / "llama-untied-raspberrypi5"
    return out, build(target="raspberrypi5", out=out, model=untied)


def _export_dir(model: Path) -> Path:
    from conftest import find_export

    found = find_export(model)
    assert found is not None
    return found


def test_the_input_embedding_is_a_gather_block_quantized_table(built, untied):
    art, res = built
    q = onnx.load(str(art / "model.onnx"), load_external_data=False)
    ops = Counter(n.op_type for n in q.graph.node)
    gbq = [n for n in q.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == 1 and gbq[0].input[1] == "input_ids", ops
    assert gbq[0].input[0].startswith("model.embed_tokens/")  # the Reshape of its own data, not the lm_head's
    attrs = {a.name: a.i for a in gbq[0].attribute}
    quant = res.manifest.to_dict()["quantization"]
    label = quant["matrix_formats"][EMBEDDING]  # the allocator's choice for it
    assert f"int{attrs['bits']}/b{attrs['block_size']}/" in label and HIDDEN % attrs["block_size"] == 0
    inits = {t.name: t for t in q.graph.initializer}
    assert EMBEDDING not in inits and f"{EMBEDDING.removesuffix('.weight')}.weight_Q{attrs['bits']}" in inits
    float_tables = [t.name for t in q.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and sorted(t.dims) == sorted([VOCAB, HIDDEN])]
    assert float_tables == [], float_tables
    assert quant["embedding"].startswith(label) and "own table" in quant["embedding"]
    assert quant["matmuls"]["int4"] + quant["matmuls"]["int8"] == 5 * 2 + 1  # MatMulNBits only


def test_the_budget_is_met_exactly_in_bytes_with_the_embedding(built, untied):
    art, res = built
    m = res.manifest.to_dict()
    alloc = m["quantization"]["allocation"]
    plan = built_plan(_export_dir(untied) / "model.onnx", load_target("raspberrypi5").quantization, m["quantization"])
    assert plan.embedding is not None and plan.embedding.matrix.K == HIDDEN and plan.embedding.matrix.N == VOCAB
    from test_bitplan import quantized_weights, stored_bytes

    names = quantized_weights(art)
    assert any(n.startswith("model.embed_tokens.") for n in names)
    assert stored_bytes(art, names) == plan.bytes() == alloc["bytes"] == m["quantization"]["bit_plan"]["bytes"] <= alloc["budget_bytes"]
    # the budget counts the embedding among the quantized weights (bits per weight over all of them)
    assert len(plan) == 5 * 2 + 2 and m["quantization"]["bit_plan"]["parameters"] == plan.parameters()
    assert alloc["budget_bytes"] == int(6.12 * plan.parameters() // 8)
    options = options_for(plan, allowed_formats(load_target("raspberrypi5").quantization), load_target("raspberrypi5").quantization)
    largest_step = max(plan.replace({n: c[-1]}).bytes() - plan.replace({n: c[0]}).bytes() for n, c in options.items())
    assert alloc["budget_bytes"] - alloc["bytes"] < largest_step  # filled: no upgrade left that fits


def test_the_artifact_stays_close_to_fp32(built, untied, zoo):
    art, _res = built
    from test_quantized_models import compare

    m = compare(CausalLM(_export_dir(untied), threads=1), CausalLM(art, threads=1), [zoo.eval_ids(256, offset=o) for o in (0, 4096)])
    assert 1e-7 < m["kl"] < MAX_KL and m["top1"] >= MIN_TOP1, m


def test_config_plan_and_estimate_count_the_embedding(built, untied):
    art, _res = built
    config = json.loads((untied / "config.json").read_text())
    graph = onnx.load(str(_export_dir(untied) / "model.onnx"), load_external_data=False)
    from_config, from_graph = plan_from_config(config, scheme_from_target(load_target("raspberrypi5").quantization)).matrices, matrices_from_onnx(graph)
    assert from_config == from_graph and not from_graph.tied
    assert [m.name for m in from_graph.matrices if m.lookup] == [EMBEDDING]
    info = inspect_model(untied)
    size = artifact_size(info.config, info.num_parameters, load_target("raspberrypi5"))
    assert size.fp32 < VOCAB * HIDDEN * 4  # the embedding is no longer an fp32 parameter
    weights = sum(f.stat().st_size for f in art.glob("model.onnx*"))
    assert 0.95 * size.total <= weights <= size.total + 64 * 1024, (weights, size)
    plan = plan_from_config(config, scheme_from_target(load_target("raspberrypi5").quantization))
    emb = plan.embedding
    # a decode step reads one row of the embedding's table, all of the rest
    assert size.per_token == size.matrices + size.fp32 - (emb.nbytes - emb.nbytes // VOCAB)


def test_fisher_sees_the_embedding(untied, zoo):
    """The embedding's Fisher proxy (squared gradients of the rows read) predicts the KL that
    quantizing it alone costs, within the scale a linear's prediction has (tests/test_fisher.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgepipe.quantize.blockwise import quantize_matrix
    from edgepipe.quantize.fisher import fisher_pair, fisher_statistics

    calib = [zoo.eval_ids(128, offset=o) for o in (0, 128, 256, 384)]
    stats, index = fisher_statistics(untied, calib, num_parameters=10**6)
    model = AutoModelForCausalLM.from_pretrained(str(untied), dtype=torch.float32).eval()
    e = model.get_input_embeddings().weight
    w = e.detach().T.contiguous().numpy()  # as the plan lists it: [hidden, vocab]
    parts = index.split(w)
    assert parts == [("model.embed_tokens", 0, VOCAB)], parts
    a, b, full = fisher_pair(stats, parts)
    assert a.shape == (HIDDEN,) and b.shape == (VOCAB,) and full is not None and full.shape == (HIDDEN, VOCAB)
    assert np.isclose(b.sum(), 1.0) and np.all(a > 0)  # b: each row's share of the calibration tokens
    held = torch.as_tensor(np.concatenate(calib)).reshape(1, -1)  # the rows the statistics saw
    dq = quantize_matrix(w, bits=4, block_size=16, symmetric=False, algorithm="rtn").dequantize()
    predicted = 0.5 * float(np.sum(np.square(w - dq, dtype=np.float64) * full))
    with torch.no_grad():
        ref = torch.log_softmax(model(held).logits[0].double(), -1)
        e.copy_(torch.as_tensor(dq.T))
        lq = torch.log_softmax(model(held).logits[0].double(), -1)
    measured = float((ref.exp() * (ref - lq)).sum(-1).mean())
    assert 0.2 <= predicted / measured <= 5, (predicted, measured)
