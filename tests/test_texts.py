"""The packaged calibration text and how many windows of it a build reads."""

from __future__ import annotations

from pathlib import Path

from edgepipe.texts import CALIB_WINDOWS, EVAL_WINDOW, SMALL_MODEL_CALIB_WINDOWS, calib_window_count, read_text_file, token_windows


def test_small_models_calibrate_on_more_windows_than_large_ones():
    assert calib_window_count(135_000_000) == SMALL_MODEL_CALIB_WINDOWS > CALIB_WINDOWS
    assert calib_window_count(2_500_000_000) == CALIB_WINDOWS


def test_the_packaged_calibration_text_fills_a_small_models_windows(zoo):
    """Even a 384-token BPE's tokens fill every window, and with a real vocabulary (fewer tokens per
    character) the text still holds SMALL_MODEL_CALIB_WINDOWS: its 120k characters are 29,973 SmolLM2 tokens."""
    calib = read_text_file(None, "calib.txt", "calibration")
    assert len(calib.text) >= 100_000
    tok = Path(zoo.model("llama")) / "tokenizer.json"
    got = token_windows(tok, calib, SMALL_MODEL_CALIB_WINDOWS, "calibration")
    assert len(got) == SMALL_MODEL_CALIB_WINDOWS and all(len(w) == EVAL_WINDOW for w in got)
