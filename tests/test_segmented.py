"""Running an fp32 export a few layers at a time (edgepipe.export.segmented): the pieces are a
valid cut of the graph, each within its weight budget, and the results are bit-identical to one
whole-graph session, for logits and for calibration statistics (kept in memory or on disk)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgepipe.export.segmented import SegmentedRunner, decoder_feeds, plan_segments, reference_logits
from edgepipe.quantize.calibrate import collect_importance, weight_matmuls
from edgepipe.runtime.model import CausalLM


@pytest.fixture(scope="module", params=["llama", "phi3"])
def fp32_dir(request, zoo):
    return zoo.fp32(request.param)


def _largest_initializer(model: onnx.ModelProto) -> int:
    return max(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)


def test_plan_segments_is_a_valid_cut_within_budget(fp32_dir):
    model = onnx.load(str(fp32_dir / "model.onnx"), load_external_data=False)
    budget = 200_000
    segs = plan_segments(model, budget)
    assert len(segs) >= 3, "a tiny budget must cut the graph into several pieces"
    assert sum(len(s.nodes) for s in segs) == len(model.graph.node)
    assert [n.name for s in segs for n in s.nodes] == [n.name for n in model.graph.node], "pieces keep the node order"
    big = _largest_initializer(model)
    for s in segs:
        assert s.weight_bytes <= max(budget, big * 2)
    produced_before: set[str] = {i.name for i in model.graph.input}
    for s in segs:  # every input of a piece is a graph input or made by an earlier piece
        assert set(s.inputs) <= produced_before
        produced_before |= s.produced
    assert len(plan_segments(model, 1 << 40)) == 1


def test_segmented_logits_equal_one_session(fp32_dir, zoo):
    wins = [zoo.eval_ids(48, offset=o) for o in (0, 100)]
    whole = CausalLM(fp32_dir, threads=1)
    ref = [whole.logits(w) for w in wins]
    runner = SegmentedRunner(fp32_dir, max_bytes=200_000, threads=1)
    assert len(runner.segments) >= 3
    got = reference_logits(fp32_dir, wins, max_bytes=200_000, threads=1)
    for a, b in zip(ref, got, strict=False):
        assert a.shape == b.shape == (48, whole.spec.vocab_size)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_watched_tensors_reach_the_caller_once_per_feed(fp32_dir, zoo):
    runner = SegmentedRunner(fp32_dir, max_bytes=200_000, threads=1)
    acts = sorted(set(weight_matmuls(runner.model).values()))
    seen: dict[str, list[int]] = {}
    done: list[str] = []
    feeds = decoder_feeds(fp32_dir, [zoo.eval_ids(16), zoo.eval_ids(16, offset=16)])
    runner.run(
        feeds, ["logits"], watch=acts,
        on_watched=lambda f, name, val: seen.setdefault(name, []).append(f),
        on_segment_done=lambda k, names: done.extend(names),
    )
    assert sorted(seen) == acts
    assert all(v == [0, 1] for v in seen.values())
    assert sorted(done) == acts


def test_calibration_is_the_same_in_pieces_and_on_disk(fp32_dir, zoo, tmp_path):
    wins = [zoo.eval_ids(32, offset=o) for o in (0, 40)]
    whole = collect_importance(fp32_dir, wins, hessians=True, threads=1)
    pieces = collect_importance(fp32_dir, wins, hessians=True, threads=1, max_segment_bytes=200_000, store=tmp_path / "h")
    assert sorted(whole) == sorted(pieces)
    hs = [k for k in whole if k.endswith("@H")]
    assert hs and len(list((tmp_path / "h").glob("*.npy"))) == len({id(whole[k]) for k in hs})
    for k in whole:
        np.testing.assert_array_equal(np.asarray(pieces[k]), np.asarray(whole[k]))
    h = np.asarray(whole[hs[0]])
    assert h.shape[0] == h.shape[1] and np.allclose(h, h.T) and (np.diag(h) >= 0).all()
    # the diagonal of the Hessian is the per-channel mean square
    w = hs[0].removesuffix("@H")
    np.testing.assert_allclose(np.diag(h), whole[w], rtol=1e-4)


def test_calibration_computes_only_the_hessians_asked_for(fp32_dir, zoo):
    wins = [zoo.eval_ids(32)]
    every = collect_importance(fp32_dir, wins, hessians=True, threads=1)
    down = {k.removesuffix("@H") for k in every if k.endswith("@H") and "down_proj" in k}
    some = collect_importance(fp32_dir, wins, hessians=down, threads=1)
    assert down and {k for k in some if k.endswith("@H")} == {f"{w}@H" for w in down}
    assert {k for k in some if not k.endswith("@H")} == {k for k in every if not k.endswith("@H")}
    for w in down:
        np.testing.assert_array_equal(np.asarray(some[f"{w}@H"]), np.asarray(every[f"{w}@H"]))
