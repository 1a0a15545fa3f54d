"""Bad input ends in one clear line, never a traceback, and writes nothing outside its destination.

Each test runs the real command (``emimimic.__main__.main``) and checks: exit status 2, exactly one
line on stderr naming the file and the field or clip, no traceback, and no file added anywhere
under ``tmp_path`` except in the destination (and ``DEST.partial``).

Classes: 2 a damaged store, 4 a resume after the inputs changed, 5 names that would escape their
folder, 6 inputs that lie about their size (or disagree on D), 7 files that are not what their
suffix says and ids written as decimals.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning  # noqa: F401 (its log handler binds the session's stderr, not one test's capsys)
import numpy as np
import pytest
from support.reference import QUICKSTART

from emimimic.__main__ import main
from emimimic.data.store.format import normalise_id
from emimimic.errors import UserError

HUGE = 10**12  # rows a lying .npy header claims


# --- helpers ---------------------------------------------------------------------------------


def files_under(root: Path, exclude: list[Path]) -> set[str]:
    """Returns the files under ``root``, except those in the ``exclude`` folders."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not any(p == e or e in p.parents for e in exclude)}


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture, root: Path,
                   dest: Path) -> str:
    """Runs ``emimimic ARGV``; asserts exit 2, one stderr line without a traceback, and no new
    file under ``root`` outside ``dest`` and ``dest.partial``; returns the line."""
    exclude = [dest, Path(f"{dest}.partial")]
    before = files_under(root, exclude)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith(f"emimimic {argv[0]}: error: "), lines[0]
    assert files_under(root, exclude) == before
    return lines[0]


def assert_names(line: str, parts: list[str]) -> None:
    for part in parts:
        assert part in line, f"{part!r} not in {line!r}"


def pack_argv(inputs: dict, dest: Path, *extra: str) -> list[str]:
    argv = ["pack", "--dest", str(dest), "--progress", "false"]
    for name, path in inputs["splits"].items():
        argv += [f"--splits.{name}", path]
    for m, path in inputs["modalities"].items():
        argv += [f"--modalities.{m}", path]
    return argv + list(extra)


def feature(inputs: dict, m: str, clip: int, suffix: str = ".npy") -> Path:
    return Path(inputs["modalities"][m]) / f"{clip:05d}{suffix}"


def lying_npy(path: Path, shape: tuple[int, ...], dtype: str = "<f4", data: bytes = b"") -> None:
    """Writes a .npy whose header claims ``shape`` but holds only ``data``."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": dtype, "fortran_order": False, "shape": shape})
        f.write(data or b"\0" * 64)


def fit_argv(store: Path, out: Path) -> list[str]:
    return ["fit", "-c", str(QUICKSTART), "--data.store", str(store), "--trainer.max_epochs", "1",
            "--trainer.default_root_dir", str(out)]


def copy_store(demo_store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo_store, tmp_path / "store"))


def edit_manifest(store: Path, change: Callable[[dict], object]) -> None:
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def edit_line(path: Path, line: int, change: Callable[[str], str]) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = change(lines[line - 1])
    path.write_text("\n".join(lines) + "\n")


def set_field(line: str, k: int, value: str) -> str:
    fields = line.split(",")
    fields[k] = value
    return ",".join(fields)


def weighted(store: Path, split: str, weights: np.ndarray | None) -> None:
    edit_manifest(store, lambda m: m["splits"][split].update(weighted=True))
    if weights is not None:
        np.save(store / split / "weights.npy", weights)


# --- class 2: a damaged store ----------------------------------------------------------------


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 if keep is None else keep])


def _index(store: Path, split: str, m: str) -> Path:
    return store / split / f"{m}.index.npy"


def _bad_index_row(store: Path) -> None:
    index = np.load(_index(store, "train", "audio"))
    index[5, 1] += 1
    np.save(_index(store, "train", "audio"), index)


#: (id, command that meets the damage, how to damage the store, what the line must name)
DAMAGED = [
    ("manifest-dim-not-int", "info",
     lambda s: edit_manifest(s, lambda m: m["modalities"]["text"].update(dim="x")),
     ["manifest.json", "modalities.text", "'x'", "integer >= 1"]),
    ("manifest-splits-a-list", "info", lambda s: edit_manifest(s, lambda m: m.update(splits=[])),
     ["manifest.json", '"splits" is []']),
    ("manifest-targets-a-string", "info",
     lambda s: edit_manifest(s, lambda m: m.update(targets="Joy")),
     ["manifest.json", "\"targets\" is 'Joy'"]),
    ("manifest-count-a-string", "info",
     lambda s: edit_manifest(s, lambda m: m["splits"]["train"].update(count="12")),
     ["manifest.json", "splits.train.count is '12'"]),
    ("manifest-present-lacks-a-modality", "info",
     lambda s: edit_manifest(s, lambda m: m["splits"]["valid"]["present"].pop("audio")),
     ["manifest.json", "splits.valid.present"]),
    ("manifest-labelled-a-string", "info",
     lambda s: edit_manifest(s, lambda m: m["splits"]["test"].update(labelled="no")),
     ["manifest.json", "splits.test.labelled is 'no'"]),
    ("manifest-version-true", "info",
     lambda s: edit_manifest(s, lambda m: m.update(format_version=True)),
     ["manifest.json", "format_version True"]),
    ("manifest-no-provenance", "info", lambda s: edit_manifest(s, lambda m: m.pop("provenance")),
     ["manifest.json", "no 'provenance'"]),
    ("manifest-not-json", "info", lambda s: (s / "manifest.json").write_text('{"steps": '),
     ["manifest.json", "not valid JSON"]),
    ("manifest-not-utf8", "info", lambda s: (s / "manifest.json").write_bytes(b'{"\xff": 1}'),
     ["manifest.json", "not UTF-8"]),
    ("index-truncated", "fit", lambda s: _truncate(_index(s, "train", "text")),
     ["train/text.index.npy", "truncated", "int64 [96, 3]"]),
    ("index-cut-in-header", "fit", lambda s: _truncate(_index(s, "valid", "visual"), 40),
     ["valid/visual.index.npy", "damaged .npy header"]),
    ("index-not-npy", "fit", lambda s: _index(s, "train", "audio").write_text("0,0,5\n"),
     ["train/audio.index.npy", "not a .npy file", "'0,0,5"]),
    ("index-float", "fit",
     lambda s: np.save(_index(s, "train", "text"), np.load(_index(s, "train", "text")) * 1.0),
     ["train/text.index.npy", "expected int64 [96, 3] index, got float64 [96, 3]"]),
    ("index-short", "fit",
     lambda s: np.save(_index(s, "valid", "text"), np.load(_index(s, "valid", "text"))[:-1]),
     ["valid/text.index.npy", "expected int64 [64, 3] index, got int64 [63, 3]"]),
    ("index-inconsistent-row", "fit", _bad_index_row,
     ["train/audio.index.npy", "inconsistent row 5 (clip 00005)"]),
    ("index-missing", "fit", lambda s: _index(s, "valid", "audio").unlink(),
     ["valid/audio.index.npy", "missing index file"]),
    ("present-disagrees", "fit",
     lambda s: edit_manifest(s, lambda m: m["splits"]["train"]["present"].update(text=0)),
     ["train/text.index.npy", "splits.train.present.text"]),
    ("data-truncated", "fit", lambda s: _truncate(s / "valid" / "audio.f16"),
     ["valid/audio.f16", "expected"]),
    ("data-missing", "fit", lambda s: (s / "train" / "visual.f16").unlink(),
     ["train/visual.f16", "missing"]),
    ("label-not-a-number", "fit",
     lambda s: edit_line(s / "train" / "labels.csv", 3, lambda t: set_field(t, 1, "abc")),
     ["train/labels.csv, line 3, clip 00001, column 'Admiration'", "'abc' is not a number"]),
    ("label-outside", "fit",
     lambda s: edit_line(s / "valid" / "labels.csv", 2, lambda t: set_field(t, 4, "1.5")),
     ["valid/labels.csv, line 2", "column 'Empathic Pain'", "'1.5'", "[0, 1]"]),
    ("labels-short-row", "fit",
     lambda s: edit_line(s / "train" / "labels.csv", 4, lambda t: t.rsplit(",", 1)[0]),
     ["train/labels.csv, line 4 (clip 00002)", "6 fields, expected 7"]),
    ("labels-duplicate-id", "fit",
     lambda s: edit_line(s / "valid" / "labels.csv", 3, lambda t: set_field(t, 0, "00096")),
     ["valid/labels.csv, line 3", "duplicate clip id 00096"]),
    ("labels-missing", "fit", lambda s: (s / "train" / "labels.csv").unlink(),
     ["train/labels.csv", "missing"]),
    ("labels-fewer-than-count", "fit",
     lambda s: edit_manifest(s, lambda m: m["splits"]["valid"].update(count=65)),
     ["valid/labels.csv", "64 clips", "splits.valid.count"]),
    ("split-folder-missing", "fit", lambda s: shutil.rmtree(s / "valid"),
     ["valid", "missing folder of split 'valid'"]),
    ("weights-missing", "fit", lambda s: weighted(s, "train", None),
     ["train/weights.npy", "missing", "weighted"]),
    ("weights-nan", "fit",
     lambda s: weighted(s, "train", np.where(np.arange(96) == 3, np.nan, 1).astype(np.float32)),
     ["train/weights.npy", "clip 00003"]),
]


@pytest.mark.parametrize(("command", "damage", "parts"), [c[1:] for c in DAMAGED],
                         ids=[c[0] for c in DAMAGED])
def test_class2_a_damaged_store_is_one_line(demo_store, tmp_path: Path, capsys, command: str,
                                            damage, parts: list[str]) -> None:
    store = copy_store(demo_store, tmp_path)
    damage(store)
    out = tmp_path / "run"
    argv = ["info", store] if command == "info" else fit_argv(store, out)
    line = one_line_error(argv, capsys, tmp_path, out)
    assert_names(line, parts)
    assert str(store) in line


# --- class 4: a resume never reuses rows of files that changed -------------------------------


def _rewrite(inputs: dict, m: str, clip: int, t: int | None = None) -> None:
    """Gives a clip new values (the same shape unless ``t`` is given)."""
    path = feature(inputs, m, clip)
    old = np.load(path)
    new = np.random.default_rng(clip).standard_normal((t or old.shape[0], old.shape[1]))
    np.save(path, new.astype(np.float16).astype(np.float32))


def _to_pkl(inputs: dict, m: str, clip: int) -> None:
    path = feature(inputs, m, clip)
    arr = np.load(path)
    path.unlink()
    feature(inputs, m, clip, ".pkl").write_bytes(pickle.dumps(arr[::-1].copy()))


def _touch(inputs: dict, m: str, clip: int) -> None:
    path = feature(inputs, m, clip)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


#: (id, extra pack flags, how an already-packed clip's files change before the rerun)
STALE = [
    ("same-size-new-values", [], lambda i: _rewrite(i, "visual", 2)),
    ("new-length", [], lambda i: _rewrite(i, "text", 1, t=140)),
    ("npy-replaced-by-pkl", [], lambda i: _to_pkl(i, "audio", 6)),
    ("file-removed-with-missing-absent", ["--missing", "absent"],
     lambda i: feature(i, "text", 7).unlink()),
    ("first-clip-changed-two-workers", ["--workers", "2"], lambda i: _rewrite(i, "audio", 0)),
    ("only-touched", [], lambda i: _touch(i, "visual", 4)),
]


@pytest.mark.parametrize(("extra", "change"), [c[1:] for c in STALE], ids=[c[0] for c in STALE])
def test_class4_a_resume_repacks_clips_whose_files_changed(raw_inputs, tmp_path: Path, capsys,
                                                           extra: list[str], change) -> None:
    inputs = raw_inputs()
    dest = tmp_path / "out" / "store"
    bad = feature(inputs, "audio", 8)  # valid split, clip 3 of 10 overall: 8 clips packed before
    good = np.load(bad)
    np.save(bad, np.full((3, 12), np.nan, dtype=np.float32))
    line = one_line_error(pack_argv(inputs, dest, *extra), capsys, tmp_path, dest)
    assert_names(line, [str(bad), "clip 00008", "NaN", f"{dest}.partial/ keeps the 8 clips packed "
                        "so far: rerun the same command to resume (clips whose files changed are "
                        "packed again)"])
    assert Path(f"{dest}.partial").is_dir() and not dest.exists()
    np.save(bad, good)
    change(inputs)  # the user also re-extracted a clip packed before the failure
    main(pack_argv(inputs, dest, *extra))
    fresh = tmp_path / "out" / "fresh"
    main(pack_argv(inputs, fresh, *extra))
    assert files_of(dest) == files_of(fresh)
    assert not Path(f"{dest}.partial").exists()


# --- class 5: names that would escape their folder -------------------------------------------


def _store_with_split(demo_store: Path, tmp_path: Path, name: str) -> Path:
    store = copy_store(demo_store, tmp_path)
    edit_manifest(store, lambda m: m.update(splits={name: m["splits"]["test"], **m["splits"]}))
    return store


def _store_with_modality(demo_store: Path, tmp_path: Path, name: str) -> Path:
    store = copy_store(demo_store, tmp_path)

    def rename(m: dict) -> None:
        m["modalities"][name] = m["modalities"].pop("text")
        for info in m["splits"].values():
            info["present"][name] = info["present"].pop("text")

    edit_manifest(store, rename)
    return store


def _pack_named(kind: str, name: str, first: bool = True
                ) -> Callable[[dict, Path, Path, Path], list[str]]:
    """Returns an argv builder giving the test split (or text modality) another name, passed
    first (or last: jsonargparse then reads a dotted key as nested and refuses it itself)."""

    def argv(inputs: dict, dest: Path, demo: Path, tmp_path: Path) -> list[str]:
        entries = inputs[kind]
        renamed = {name: entries.pop("test" if kind == "splits" else "text")}
        inputs[kind] = {**renamed, **entries} if first else {**entries, **renamed}
        return pack_argv(inputs, dest)

    return argv


#: (id, argv builder (inputs, destination, demo store, tmp_path), what the line must name)
ESCAPES = [
    ("pack-split-parent", _pack_named("splits", "../escaped"),
     ["--splits.../escaped", "split name '../escaped' is not allowed"]),
    ("pack-split-grandparent", _pack_named("splits", "../../escaped"),
     ["split name '../../escaped'"]),
    ("pack-split-hidden", _pack_named("splits", ".hidden"), ["split name '.hidden'"]),
    ("pack-split-option-like", _pack_named("splits", "-rf"), ["split name '-rf'"]),
    ("pack-split-parent-after-another", _pack_named("splits", "../escaped", first=False),
     ['Parser key "splits"']),
    ("pack-modality-parent", _pack_named("modalities", "../m"),
     ["--modalities.../m", "modality name '../m' is not allowed"]),
    ("pack-modality-absolute", _pack_named("modalities", "/tmp/m"),
     ["modality name '/tmp/m'"]),
    ("store-split-parent",
     lambda i, d, demo, tmp: ["info", _store_with_split(demo, tmp, "../escaped")],
     ["store/manifest.json", "split name '../escaped' is not allowed"]),
    ("store-modality-parent",
     lambda i, d, demo, tmp: ["info", _store_with_modality(demo, tmp, "../../x")],
     ["store/manifest.json", "modality name '../../x' is not allowed"]),
]


@pytest.mark.parametrize(("make_argv", "parts"), [c[1:] for c in ESCAPES],
                         ids=[c[0] for c in ESCAPES])
def test_class5_names_that_would_escape_are_refused(raw_inputs, demo_store, tmp_path: Path,
                                                   capsys, make_argv, parts: list[str]) -> None:
    inputs = raw_inputs()
    dest = tmp_path / "out" / "dest" / "store"
    argv = make_argv(inputs, dest, demo_store, tmp_path)
    line = one_line_error(argv, capsys, tmp_path, dest)
    assert_names(line, parts)
    assert not Path(f"{dest}.partial").exists() and not dest.exists()
    assert not any("escaped" in p.name for p in tmp_path.rglob("*"))


def test_class5_target_names_are_not_restricted(raw_inputs, tmp_path: Path, capsys) -> None:
    """Targets are CSV columns, not file names: spaces and dots are fine."""
    targets = ["Empathic Pain", "a.b", "x/y"]
    inputs = raw_inputs(targets=targets)
    main(pack_argv(inputs, tmp_path / "store", "--targets", "null"))
    assert "3: Empathic Pain, a.b, x/y" in capsys.readouterr().out
    capsys.readouterr()
    main(["info", str(tmp_path / "store")])


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("av") is None,
                    reason="the extract extra is not installed")
def test_class5_extract_refuses_an_escaping_split(raw_inputs, tmp_path: Path, capsys) -> None:
    inputs = raw_inputs()
    work = tmp_path / "work"
    line = one_line_error(["extract", "--splits.../escaped", inputs["splits"]["train"],
                           "--raw", inputs["root"], "--work", work, "--store", tmp_path / "s",
                           "--modalities", "[audio]", "--audio.model", "none"],
                          capsys, tmp_path, work)
    assert "split name '../escaped' is not allowed" in line
    assert not work.exists()


# --- class 6: inputs that lie about their size, or disagree on D -----------------------------


def _pkl_inputs(inputs: dict, m: str) -> None:
    for path in sorted(Path(inputs["modalities"][m]).glob("*.npy")):
        path.with_suffix(".pkl").write_bytes(pickle.dumps(np.load(path)))
        path.unlink()


def _odd_first_pkl(inputs: dict) -> str:
    _pkl_inputs(inputs, "visual")
    feature(inputs, "visual", 0, ".pkl").write_bytes(pickle.dumps(np.ones((3, 9), np.float32)))
    return str(feature(inputs, "visual", 0, ".pkl"))


def _tie(inputs: dict) -> None:
    for clip in range(7):
        np.save(feature(inputs, "visual", clip), np.ones((2, 9 if clip < 6 else 10), np.float32))


def _lying_store_index(store: Path) -> None:
    lying_npy(_index(store, "train", "visual"), (HUGE, 3), "<i8")


#: (id, how to break the pack inputs or (store) the store, what the line must name)
LIARS = [
    ("npy-claims-1e12-rows", "pack",
     lambda i: lying_npy(feature(i, "audio", 4), (HUGE, 12)),
     ["audio/00004.npy (clip 00004, modality audio)", str(HUGE), "truncated"]),
    ("npy-claims-1e12-rows-in-the-first-file", "pack",
     lambda i: lying_npy(feature(i, "text", 0), (HUGE, 16)),
     ["text/00000.npy (clip 00000, modality text)", str(HUGE)]),
    ("npy-claims-fewer-bytes", "pack",
     lambda i: lying_npy(feature(i, "text", 9), (2, 16), data=b"\0" * 4096),
     ["text/00009.npy (clip 00009, modality text)", "bytes after the array"]),
    ("first-file-has-another-d", "pack",
     lambda i: np.save(feature(i, "visual", 0), np.ones((4, 9), np.float32)),
     ["visual/00000.npy (clip 00000, modality visual)", "expected D = 8", "(4, 9)",
      "12 of the modality's 13 files"]),
    ("two-files-have-another-d", "pack",
     lambda i: [np.save(feature(i, "text", c), np.ones((2, 15), np.float32)) for c in (0, 11)],
     ["text/00000.npy (clip 00000, modality text)", "expected D = 16",
      "1 more file with another D", "text/00011.npy (clip 00011"]),
    ("first-pkl-has-another-d", "pack", _odd_first_pkl,
     ["visual/00000.pkl (clip 00000, modality visual)", "expected D = 8"]),
    ("no-majority-d", "pack", _tie,
     ["modality visual", "no majority", "D = 8 in 6 files", "D = 9 in 6 files", "clip 000"]),
    ("store-index-claims-1e12-rows", "store", _lying_store_index,
     ["train/visual.index.npy", str(HUGE), "truncated"]),
    ("store-weights-claim-1e12", "store",
     lambda s: (weighted(s, "valid", None), lying_npy(s / "valid" / "weights.npy", (HUGE,))),
     ["valid/weights.npy", str(HUGE)]),
]


@pytest.mark.parametrize(("where", "breaks", "parts"), [c[1:] for c in LIARS],
                         ids=[c[0] for c in LIARS])
def test_class6_sizes_are_checked_before_allocating(raw_inputs, demo_store, tmp_path: Path,
                                                    capsys, where: str, breaks,
                                                    parts: list[str]) -> None:
    if where == "store":
        store = copy_store(demo_store, tmp_path)
        breaks(store)
        out = tmp_path / "run"
        line = one_line_error(fit_argv(store, out), capsys, tmp_path, out)
    else:
        inputs = raw_inputs()
        breaks(inputs)
        dest = tmp_path / "store"
        line = one_line_error(pack_argv(inputs, dest), capsys, tmp_path, dest)
        assert not dest.exists()
    assert_names(line, parts)
    assert "MemoryError" not in line


# --- class 7: files that are not what their suffix says; decimal ids -------------------------


def _text_as(inputs: dict, m: str, clip: int, suffix: str) -> None:
    feature(inputs, m, clip).unlink()
    feature(inputs, m, clip, suffix).write_text("hello world, these are not features\n")


def _npy_as_pkl(inputs: dict) -> None:
    path = feature(inputs, "audio", 5)
    path.rename(path.with_suffix(".pkl"))


def _ids_as(inputs: dict, split_csv, ids: list[str]) -> None:
    path = Path(inputs["splits"]["train"])
    split_csv(path, ids, inputs["labels"]["train"])


#: (id, how to break the inputs (given them and the CSV writer), what the line must name)
MISLABELLED = [
    ("text-as-pkl", lambda i, c: _text_as(i, "visual", 3, ".pkl"),
     ["visual/00003.pkl (clip 00003, modality visual)",
      "not a pickle (it starts with 'hello wo...')", "expected a pickled numpy array"]),
    ("text-as-npy", lambda i, c: _text_as(i, "text", 2, ".npy"),
     ["text/00002.npy (clip 00002, modality text)",
      "not a .npy file (it starts with 'hello wo...')"]),
    ("npy-as-pkl", lambda i, c: _npy_as_pkl(i),
     ["audio/00005.pkl (clip 00005, modality audio)", "a .npy file", "rename it to .npy"]),
    ("empty-pkl", lambda i, c: _text_as(i, "text", 4, ".pkl") or
     feature(i, "text", 4, ".pkl").write_bytes(b""),
     ["text/00004.pkl (clip 00004, modality text)", "empty file"]),
    ("non-integer-decimal-id", lambda i, c: _ids_as(i, c, ["0", "1.5", "2", "3", "4", "5"]),
     ["train.csv, line 3", "'1.5' is not a valid clip id", "must be an integer",
      "1 and 1.0 mean clip 00001"]),
    ("id-with-a-separator", lambda i, c: _ids_as(i, c, ["0", "1", "a/b", "3", "4", "5"]),
     ["train.csv, line 4", "'a/b' is not a valid clip id", "1 and 1.0 mean clip 00001"]),
]


@pytest.mark.parametrize(("breaks", "parts"), [c[1:] for c in MISLABELLED],
                         ids=[c[0] for c in MISLABELLED])
def test_class7_a_file_is_named_for_what_it_is(raw_inputs, split_csv, tmp_path: Path, capsys,
                                               breaks, parts: list[str]) -> None:
    inputs = raw_inputs()
    breaks(inputs, split_csv)
    dest = tmp_path / "store"
    line = one_line_error(pack_argv(inputs, dest), capsys, tmp_path, dest)
    assert_names(line, parts)
    assert "pickled (object) data" not in line


def test_class7_integer_valued_decimal_ids_name_their_clip(raw_inputs, split_csv,
                                                           tmp_path: Path) -> None:
    """``1.0`` (as spreadsheets write integer ids) is clip 00001: the same store as ``1``."""
    inputs = raw_inputs()
    main(pack_argv(inputs, tmp_path / "ints"))
    _ids_as(inputs, split_csv, ["0.0", "1.", "2.000", "00003.0", "4", "5.0"])
    main(pack_argv(inputs, tmp_path / "decimals"))
    assert files_of(tmp_path / "decimals") == files_of(tmp_path / "ints")


@pytest.mark.parametrize(("text", "clip"), [("1", "00001"), ("1.0", "00001"), ("12.", "00012"),
                                            ("007.000", "00007"), ("123456", "123456"),
                                            ("clip_a", "clip_a"), (" 3 ", "00003")])
def test_normalise_id_rule(text: str, clip: str) -> None:
    assert normalise_id(text, "x.csv") == clip


@pytest.mark.parametrize("text", ["1.5", ".5", "", "../1", ".hidden", "a\\b", "a\tb"])
def test_normalise_id_refuses(text: str) -> None:
    with pytest.raises(UserError, match="x.csv: Filename .* is not a valid clip id"):
        normalise_id(text, "x.csv")
