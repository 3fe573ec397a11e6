"""The weight-file pages a loaded session no longer reads are given back (edgepipe.runtime.pages),
and the tied table is read through the mapped file, not a folded heap copy (edgepipe.quantize.graph)."""

from __future__ import annotations

import mmap
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgepipe.runtime.model import CausalLM, session_options
from edgepipe.runtime.pages import file_mappings, release_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise are Linux's")
PAGE = mmap.PAGESIZE


def _resident(path) -> int:
    return sum(rss for _, _, rss, _ in file_mappings(path))


def test_release_drops_clean_pages_and_keeps_the_data(tmp_path):
    path = tmp_path / "w.bin"
    data = np.random.default_rng(0).integers(0, 256, 64 * PAGE, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())  # clean in the page cache, as a model file is: it can be dropped from there
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    view = np.frombuffer(m, dtype=np.uint8)
    assert int(view.sum()) == int(data.sum())  # every page read
    assert _resident(path) >= 64 * PAGE
    assert release_file_pages(path) >= 64 * PAGE
    assert _resident(path) == 0
    # random access now: reading one page brings back that page and at most the kernel's fault-around
    # window of cached neighbours (16 pages by default), not the read-ahead of the whole file
    assert int(view[10 * PAGE]) == int(data[10 * PAGE])
    assert _resident(path) <= 16 * PAGE
    assert np.array_equal(view, data)  # everything reads back from the file
    del view
    m.close()


def test_release_skips_a_mapping_the_process_wrote(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(8 * PAGE))
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private, writable: a write is this process's own page
    m[PAGE] = 7
    assert [w for *_, w in file_mappings(path)] == [True]
    release_file_pages(path)
    assert m[PAGE] == 7  # not dropped: MADV_DONTNEED would have discarded the write
    m.close()


def test_release_is_harmless_without_mappings(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(bytes(PAGE))
    assert file_mappings(path) == []
    assert release_file_pages(path) == 0
    assert release_file_pages(tmp_path / "missing.bin") == 0


def _greedy(step, prompt: np.ndarray, n: int) -> list[int]:
    out = [int(np.argmax(step(prompt)[-1]))]
    for _ in range(n - 1):
        out.append(int(np.argmax(step(np.array([out[-1]]))[-1])))
    return out


def test_session_gives_back_the_weight_pages_and_outputs_are_unchanged(zoo):
    """After loading, none of the weight file's pages stay resident (prepacking read all of them);
    generation reads back only what it needs, and its logits are bit-identical to a session that
    kept them."""
    art = zoo.artifact("llama", "int8-rtn")[0]
    data = art / "model.onnx.data"
    lm = CausalLM(art, threads=1)
    assert lm.released_bytes > 0
    assert _resident(data) == 0
    prompt = zoo.eval_ids(40)
    st = lm.stepper(64)
    got = _greedy(lambda ids: st.step(ids).copy(), prompt, 8)
    logits = lm.logits(prompt)

    # the same graph in a plain session (nothing released): same tokens, same logits
    ref = CausalLM(art, threads=1, release_pages=False)
    assert ref.released_bytes == 0 and _resident(data) > 0
    st_ref = ref.stepper(64)
    assert _greedy(lambda ids: st_ref.step(ids).copy(), prompt, 8) == got
    assert np.array_equal(ref.logits(prompt), logits)


@pytest.mark.parametrize("target", ["int8-rtn", "raspberrypi5"])
def test_tied_table_is_not_folded_into_a_copy(zoo, target, tmp_path):
    """onnxruntime folds a Reshape of a constant into a new initializer, a heap copy of the whole
    table; the table's shape is a graph input so that the lookup reads the mapped table itself."""
    art = zoo.artifact("llama", target)[0]
    q = onnx.load(str(art / "model.onnx"), load_external_data=False)
    gbq = next(n for n in q.graph.node if n.op_type == "GatherBlockQuantized")
    reshape = next(n for n in q.graph.node if gbq.input[0] in n.output)
    assert reshape.op_type == "Reshape" and reshape.input[1] in {i.name for i in q.graph.input}
    # what onnxruntime makes of it (ORT_ENABLE_ALL): the Reshape of the quantized table is still there
    so = session_options(1)
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(art / "model.onnx"), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    table = reshape.input[0]
    gbq_opt = next(n for n in opt.graph.node if n.op_type == "GatherBlockQuantized")
    feeding = next(n for n in opt.graph.node if gbq_opt.input[0] in n.output)
    assert feeding.op_type == "Reshape" and feeding.input[0] == table
