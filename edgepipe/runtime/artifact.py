"""Open an artifact on the device: verify every hash, check free memory, load what its kind says.

The manifest's ``kind`` picks the loader from :mod:`edgepipe.runtime.kinds`; nothing here looks at
the files to decide what the artifact is.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepipe.errors import ArtifactError, InputError
from edgepipe.runtime.facts import artifact_bytes, mem_available_mb
from edgepipe.runtime.generate import GenerationConfig, generate
from edgepipe.runtime.kinds import spec_of
from edgepipe.runtime.manifest import Manifest, check_artifact

if TYPE_CHECKING:
    from edgepipe.runtime.speculative import SpecStats

TOKENIZER = "tokenizer.json"
logger = logging.getLogger(__name__)


def load_tokenizer(model_dir: Path) -> Any:
    from tokenizers import Tokenizer

    path = Path(model_dir) / TOKENIZER
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; rebuild the artifact")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise ArtifactError(f"{path} cannot be read by tokenizers ({str(e)[:200]}); rebuild the artifact") from None


def check_free_ram(artifact: Path, manifest: Manifest | None = None) -> None:
    """Refuse to load when the device has clearly too little free memory for the model."""
    need = artifact_bytes(artifact) / 2**20 * 1.3 + 64
    metrics = manifest.metrics if manifest is not None else None
    throughput = metrics.get("throughput") if isinstance(metrics, dict) else None
    measured = throughput.get("peak_rss_mb") if isinstance(throughput, dict) else None
    if isinstance(measured, (int, float)) and not isinstance(measured, bool) and 0 < measured < 1e7:
        need = max(need, float(measured))
    avail = mem_available_mb()
    if avail is not None and avail < need:
        raise InputError(
            f"this device has {avail:.0f} MB of free RAM and the artifact needs about {need:.0f} MB; "
            "close other programs or build for a smaller target"
        )


def open_artifact(
    artifact: Path | str, *, threads: int = 0, verify: bool = True, generates: bool = False
) -> tuple[Any, Manifest]:
    """Verify the signature (when the device trusts keys: :mod:`.signing`) and the manifest's hashes
    (``verify=False``: the signature against the manifest only), then load the model its kind names:
    an :class:`edgepipe.runtime.lm.LM` for decoders, a ``SentenceEncoder`` for encoders.
    ``generates``: the caller needs text generation; other kinds are refused by name, before loading.
    An artifact whose signature was not checked is loaded with a warning saying so."""
    artifact = Path(artifact)
    manifest, signature = check_artifact(artifact, hash_files=verify)
    if signature.status != "verified":
        logger.warning("%s: %s", artifact, signature.describe())
    spec = spec_of(manifest.kind)
    if generates and not spec.generates:
        raise InputError(f"{artifact} is a {manifest.kind} artifact ({spec.description}); it cannot run, bench or validate text")
    check_free_ram(artifact, manifest)
    return spec.load(artifact, threads=manifest.threads(threads)), manifest


def tokenizer_identity(model_dir: Path) -> Any:
    """What makes two ``tokenizer.json`` files give the same ids: the model (vocabulary, merges),
    the added tokens, and the text transforms before and after."""
    path = Path(model_dir) / TOKENIZER
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return [doc.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor")]
    except (OSError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{path} is missing or not JSON ({type(e).__name__}); rebuild the artifact") from None


def open_draft(artifact: Path | str, draft: Path | str, *, threads: int = 0) -> Any:
    """The draft model for speculative decoding: an artifact of the same tokenizer (refused in
    one line otherwise, before it is loaded) whose steps take several tokens."""
    from edgepipe.runtime.speculative import check_capable

    if tokenizer_identity(Path(draft)) != tokenizer_identity(Path(artifact)):
        raise InputError(f"--draft {draft} has another tokenizer than {artifact}; a draft model must share the model's tokenizer")
    lm, _ = open_artifact(draft, threads=threads, generates=True)
    check_capable(lm, f"the draft artifact {draft}")
    return lm


def run_prompt(
    artifact: Path | str, prompt: str, cfg: GenerationConfig, *, threads: int = 0, draft: Path | str | None = None,
    stats: SpecStats | None = None,
) -> Iterator[str]:
    """Verify and load the artifact (and the ``draft`` artifact) now, so errors surface before any
    output, then return an iterator of decoded text pieces as they are generated. ``cfg.lookup``
    or ``draft``: speculative decoding (:mod:`.speculative`, which fills ``stats``)."""
    from edgepipe.runtime.args import prompt_text
    from edgepipe.runtime.speculative import check_capable, check_one_drafter

    prompt_text(prompt)
    check_one_drafter(cfg.lookup, draft)
    lm, _ = open_artifact(artifact, threads=threads, generates=True)
    if cfg.lookup or draft is not None:
        check_capable(lm, f"{artifact}")
    draft_lm = open_draft(artifact, draft, threads=threads) if draft is not None else None
    tok = load_tokenizer(Path(artifact))
    ids = tok.encode(prompt).ids
    if not ids:
        raise InputError("the prompt is empty after tokenization; pass some text with --prompt")
    if len(ids) >= lm.context_length:
        raise InputError(
            f"the prompt is {len(ids)} tokens and this artifact's context holds {lm.context_length} "
            "(prompt plus at least one new token); shorten the prompt"
        )

    return decode_pieces(tok, generate(lm, ids, cfg, draft=draft_lm, stats=stats))


def decode_pieces(tok: Any, tokens: Iterable[int]) -> Generator[str, None, None]:
    """Text pieces as ``tokens`` arrive: decoding the whole output each time keeps merges and
    spaces right, and a piece is held back until its last UTF-8 character is complete."""
    out: list[int] = []
    printed = ""
    for token in tokens:
        out.append(token)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):
            yield text[len(printed):]
            printed = text


