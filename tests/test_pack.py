"""``emimimic pack``: round trips, one clear error per bad input, safe pickles, resumable runs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from support.reference import torch_pool

from emimimic.constants import EMOTIONS
from emimimic.data import commands
from emimimic.data import pack as pack_mod
from emimimic.data.pack import pack
from emimimic.data.store import FeatureStore, StoreError


def check_round_trip(store: FeatureStore, inputs: dict) -> None:
    for name, labels in inputs["labels"].items():
        view = store.split(name)
        if labels is None:
            assert view.labels is None
        else:
            np.testing.assert_allclose(view.labels, labels, atol=1e-6)
        for i, clip in enumerate(view.ids):
            for m in store.dims:
                np.testing.assert_array_equal(view.read(m, i), torch_pool(inputs["raw"][(m, clip)]),
                                              err_msg=f"{m} {clip}")


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_pack_round_trip_from_npy(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    store = FeatureStore(pack(tmp_path / "store", inputs["splits"], inputs["modalities"],
                              progress=False))
    assert store.splits == ["train", "valid", "test"]
    assert store.targets == list(EMOTIONS)
    assert store.dims == {"visual": 8, "audio": 12, "text": 16}
    assert store.split("train").ids == ["00000", "00001", "00002", "00003", "00004", "00005"]
    assert store.split("test").ids == ["00010", "00011", "00012"]
    assert store.manifest["splits"]["test"]["labelled"] is False
    assert store.provenance["synthetic"] is False
    check_round_trip(store, inputs)
    assert not Path(f"{tmp_path / 'store'}.partial").exists()


def test_pack_round_trip_from_pkl_and_torch_files(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    for n, npy in enumerate(sorted(Path(inputs["modalities"]["audio"]).glob("*.npy"))):
        arr = np.load(npy)
        if n % 2:
            torch.save(torch.from_numpy(arr), npy.with_suffix(".pkl"))
        else:
            npy.with_suffix(".pkl").write_bytes(pickle.dumps(arr, protocol=n % 3 + 3))
        npy.unlink()
    store = FeatureStore(pack(tmp_path / "store", inputs["splits"], inputs["modalities"],
                              progress=False))
    check_round_trip(store, inputs)


def test_missing_absent_records_absence(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    (Path(inputs["modalities"]["text"]) / "00002.npy").unlink()
    store = FeatureStore(pack(tmp_path / "store", inputs["splits"], inputs["modalities"],
                              missing="absent", progress=False))
    view = store.split("train")
    assert view.present("text").tolist() == [True, True, False, True, True, True]
    assert not view.read("text", 2).any()
    assert store.manifest["splits"]["train"]["present"]["text"] == 5


# --- one clear error per bad input -----------------------------------------------------------


def pack_error(inputs: dict, dest: Path, **kwargs) -> str:
    with pytest.raises(StoreError) as info:
        pack(dest, inputs["splits"], inputs["modalities"], progress=False, **kwargs)
    return str(info.value)


def feature(inputs: dict, m: str, clip: int) -> Path:
    return Path(inputs["modalities"][m]) / f"{clip:05d}.npy"


def save(inputs: dict, m: str, clip: int, arr: np.ndarray) -> str:
    np.save(feature(inputs, m, clip), arr, allow_pickle=arr.dtype == object)
    return str(feature(inputs, m, clip))


def with_value(shape: tuple[int, int], value: float) -> np.ndarray:
    arr = np.ones(shape, dtype=np.float32)
    arr[shape[0] // 2, 3] = value
    return arr


def relabel(inputs: dict, write_csv, split: str, row: int, col: int, value: float) -> None:
    labels = inputs["labels"][split].copy()
    labels[row, col] = value
    first = {"train": 0, "valid": 6}[split]
    write_csv(Path(inputs["splits"][split]), range(first, first + len(labels)), labels)


def drop_last_label(inputs: dict) -> None:
    csv = Path(inputs["splits"]["train"])
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ","  # clip 00001 loses its Joy value
    csv.write_text("\n".join(lines) + "\n")


def both_npy_and_pkl(inputs: dict) -> None:
    npy = feature(inputs, "audio", 2)
    npy.with_suffix(".pkl").write_bytes(pickle.dumps(np.load(npy)))


def pickled(inputs: dict, m: str, clip: int, obj: object) -> str:
    feature(inputs, m, clip).unlink()
    pkl = feature(inputs, m, clip).with_suffix(".pkl")
    pkl.write_bytes(pickle.dumps(obj))
    return str(pkl)


#: (id, how to break the inputs (given them and the CSV writer; returns the bad file or ""),
#: pack kwargs, message parts ({file}: the bad file), whether pack fails before writing anything)
BAD_INPUTS = [
    ("missing-file", lambda i, csv: feature(i, "text", 2).unlink() or "", {},
     ["text/00002.npy", "clip 00002", "missing feature file"], True),
    ("wrong-dim", lambda i, csv: save(i, "audio", 3, np.zeros((5, 11), np.float32)), {},
     ["{file}", "clip 00003", "expected D = 12"], False),
    ("wrong-ndim", lambda i, csv: save(i, "visual", 4, np.zeros((2, 5, 8), np.float32)), {},
     ["{file}", "clip 00004", "ndim 3"], False),
    ("empty-array", lambda i, csv: save(i, "visual", 1, np.zeros((0, 8), np.float32)), {},
     ["{file}", "clip 00001", "empty array"], False),
    ("nan", lambda i, csv: save(i, "text", 7, with_value((4, 16), np.nan)), {},
     ["{file}", "clip 00007", "NaN or Inf"], False),
    ("inf", lambda i, csv: save(i, "text", 7, with_value((4, 16), np.inf)), {},
     ["{file}", "clip 00007", "NaN or Inf"], False),
    ("beyond-float16", lambda i, csv: save(i, "text", 8, with_value((4, 16), 1e6)), {},
     ["{file}", "clip 00008", "beyond float16's range"], False),
    ("object-npy", lambda i, csv: save(i, "audio", 5, np.array([{"x": 1}], dtype=object)), {},
     ["{file}", "without pickles"], False),
    ("pickled-list", lambda i, csv: pickled(i, "visual", 2, [1.0, 2.0]), {},
     ["{file}", "expected a pickled numpy array, got list"], False),
    ("both-npy-and-pkl", lambda i, csv: both_npy_and_pkl(i), {},
     ["00002.npy", "00002.pkl", "two feature files for clip 00002"], True),
    ("label-outside", lambda i, csv: relabel(i, csv, "valid", 1, 4, 1.5), {},
     ["valid.csv, line 3, clip 00007, column 'Excitement'", "outside [0, 1]"], True),
    ("missing-label", lambda i, csv: drop_last_label(i), {},
     ["train.csv, line 3, clip 00001, column 'Joy'", "missing label"], True),
    ("nan-label", lambda i, csv: relabel(i, csv, "train", 0, 0, np.nan), {},
     ["clip 00000, column 'Admiration'", "missing label (NaN)"], True),
    ("wrong-header", lambda i, csv: csv(Path(i["splits"]["train"]), range(6),
                                         i["labels"]["train"],
                                         [*EMOTIONS[:3], "Empathic_Pain", *EMOTIONS[4:]]) and "",
     {}, ["train.csv", "Empathic_Pain", "expected"], True),
    ("duplicate-in-split", lambda i, csv: csv(Path(i["splits"]["train"]), [0, 1, 2, 3, 1, 5],
                                               i["labels"]["train"]) and "",
     {}, ["train.csv, line 6: duplicate clip id 00001 (first on line 3)"], True),
    ("duplicate-across-splits",
     lambda i, csv: csv(Path(i["splits"]["test"]), [10, 11, 3], None) and "", {},
     ["test.csv: clip id 00003 also appears in split 'train'"], True),
    ("no-features-anywhere",
     lambda i, csv: csv(Path(i["splits"]["test"]), [10, 11, 12, 99], None) and "",
     {"missing": "absent"}, ["clip 00099", "test.csv", "no feature file in any modality"], True),
    ("existing-destination", lambda i, csv: (i["root"].parent / "store").mkdir() or "", {},
     ["{dest}", "already exists"], True),
    ("zero-workers", lambda i, csv: "", {"workers": 0}, ["workers=0; expected at least 1"], True),
    ("bad-missing-policy", lambda i, csv: "", {"missing": "skip"}, ["missing='skip'"], True),
]


@pytest.mark.parametrize(("breaks", "kwargs", "parts", "before_writing"),
                         [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_clear_error(raw_inputs, split_csv, tmp_path: Path, breaks,
                                      kwargs: dict, parts: list[str],
                                      before_writing: bool) -> None:
    inputs = raw_inputs()
    dest = tmp_path / "store"
    bad = str(breaks(inputs, split_csv) or "")
    msg = pack_error(inputs, dest, **kwargs)
    for part in parts:
        assert part.format(file=bad, dest=dest) in msg, msg
    assert Path(f"{dest}.partial").exists() != before_writing
    assert not dest.exists() or kwargs == {} and "already exists" in msg


@pytest.mark.parametrize("case", ["wrong-dim", "nan", "pickled-list"])
def test_bad_file_read_by_a_worker_is_the_same_clear_error(raw_inputs, split_csv,
                                                           tmp_path: Path, case: str) -> None:
    breaks, _, parts, _ = next(c[1:] for c in BAD_INPUTS if c[0] == case)
    inputs = raw_inputs()
    bad = str(breaks(inputs, split_csv))
    msg = pack_error(inputs, tmp_path / "store", workers=2)
    for part in parts:
        assert part.format(file=bad) in msg, msg


def test_csvs_are_validated_before_any_feature_file(raw_inputs, split_csv, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = raw_inputs()
    labels = inputs["labels"]["valid"].copy()
    labels[0, 0] = -0.1
    split_csv(Path(inputs["splits"]["valid"]), range(6, 10), labels)

    def refuse(path: Path) -> np.ndarray:
        raise AssertionError(f"feature file {path} read before the CSVs were validated")

    monkeypatch.setattr(pack_mod, "load_feature_file", refuse)
    msg = pack_error(inputs, tmp_path / "store")
    assert "valid.csv, line 2, clip 00006" in msg


# --- untrusted pickles -----------------------------------------------------------------------


class Payload:
    """Runs a shell command when unpickled by a plain ``pickle.load``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_does_not_run(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    marker = tmp_path / "pwned"
    folder = Path(inputs["modalities"]["visual"])
    (folder / "00003.npy").unlink()
    (folder / "00003.pkl").write_bytes(pickle.dumps(Payload(marker)))
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))  # the payload does work...
    assert (tmp_path / "control").exists()
    msg = pack_error(inputs, tmp_path / "store")
    assert not marker.exists()  # ...but not through pack
    assert "00003.pkl" in msg and "system" in msg and "not allowed" in msg


def test_malicious_torch_file_is_refused_and_does_not_run(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    marker = tmp_path / "pwned"
    folder = Path(inputs["modalities"]["visual"])
    (folder / "00003.npy").unlink()
    torch.save({"x": Payload(marker)}, folder / "00003.pkl")
    msg = pack_error(inputs, tmp_path / "store")
    assert not marker.exists()
    assert "00003.pkl" in msg and "refused torch file" in msg


def test_pickled_non_array_is_refused(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    folder = Path(inputs["modalities"]["visual"])
    (folder / "00002.npy").unlink()
    (folder / "00002.pkl").write_bytes(pickle.dumps([1.0, 2.0]))
    msg = pack_error(inputs, tmp_path / "store")
    assert "00002.pkl" in msg and "expected a pickled numpy array, got list" in msg


# --- resumable runs --------------------------------------------------------------------------


def test_interrupted_pack_resumes_to_identical_store(raw_inputs, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = raw_inputs()
    reference = pack(tmp_path / "reference", inputs["splits"], inputs["modalities"],
                     progress=False)
    dest = tmp_path / "store"
    bad = Path(inputs["modalities"]["audio"]) / "00008.npy"  # valid split, clip 2 of 4
    good = np.load(bad)
    np.save(bad, np.full((3, 12), np.nan, dtype=np.float32))
    with pytest.raises(StoreError, match="clip 00008"):
        pack(dest, inputs["splits"], inputs["modalities"], progress=False)
    partial = Path(f"{dest}.partial")
    assert partial.is_dir() and not dest.exists()
    assert not (partial / "manifest.json").exists()
    with pytest.raises(StoreError, match=r"an unfinished build is in .*store\.partial"):
        FeatureStore(dest)
    # a crash between writing data and recording progress leaves bytes past the recorded point
    with open(partial / "valid" / "text.f16", "ab") as f:
        f.write(b"\x01" * 64)
    np.save(bad, good)
    loaded: list[str] = []
    real_load = pack_mod.load_feature_file

    def spy(path: Path) -> np.ndarray:
        loaded.append(Path(path).stem)
        return real_load(path)

    monkeypatch.setattr(pack_mod, "load_feature_file", spy)
    pack(dest, inputs["splits"], inputs["modalities"], progress=False)
    # dims come from the .npy headers now, so only the clips packed again are loaded
    assert sorted(loaded) == sorted([f"{i:05d}" for i in range(8, 13)] * 3)  # 3 modalities;
    # train and clips 6, 7 were not redone
    assert files_of(dest) == files_of(reference)
    assert not partial.exists()


def cli_args(inputs: dict, dest: Path) -> list[str]:
    argv = ["--dest", str(dest), "--progress", "false"]
    for name, path in inputs["splits"].items():
        argv += [f"--splits.{name}", path]
    for m, path in inputs["modalities"].items():
        argv += [f"--modalities.{m}", path]
    return argv


def test_two_workers_give_a_byte_identical_store(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs(train=20, valid=9, test=5)
    one = pack(tmp_path / "one", inputs["splits"], inputs["modalities"], progress=False)
    commands.pack_main([*cli_args(inputs, tmp_path / "two"), "--workers", "2"])
    assert files_of(tmp_path / "two") == files_of(one)
    check_round_trip(FeatureStore(tmp_path / "two"), inputs)


def test_interrupted_two_worker_pack_resumes_to_identical_store(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs(train=20, valid=9, test=5)
    reference = pack(tmp_path / "reference", inputs["splits"], inputs["modalities"],
                     progress=False)
    dest = tmp_path / "store"
    bad = Path(inputs["modalities"]["audio"]) / "00023.npy"  # valid split, clip 3 of 9
    good = np.load(bad)
    np.save(bad, np.full((3, 12), np.nan, dtype=np.float32))
    with pytest.raises(StoreError, match=r"00023.npy \(clip 00023, modality audio\)"):
        pack(dest, inputs["splits"], inputs["modalities"], progress=False, workers=2)
    partial = Path(f"{dest}.partial")
    # clips read ahead by the workers after the bad one are not written
    progress = json.loads((partial / "progress.json").read_text())
    assert {n: s["done"] for n, s in progress["splits"].items()} == {"train": 20, "valid": 3,
                                                                      "test": 0}
    np.save(bad, good)
    pack(dest, inputs["splits"], inputs["modalities"], progress=False, workers=2)
    assert files_of(dest) == files_of(reference)
    assert not partial.exists()


def test_resume_with_other_inputs_is_refused(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    bad = Path(inputs["modalities"]["audio"]) / "00004.npy"
    np.save(bad, np.zeros((0, 12), dtype=np.float32))
    with pytest.raises(StoreError, match="clip 00004"):
        pack(tmp_path / "store", inputs["splits"], inputs["modalities"], progress=False)
    np.save(bad, np.ones((2, 12), dtype=np.float32))
    msg = pack_error(inputs, tmp_path / "store", provenance={"extractor": "other"})
    assert "store.partial" in msg and "different inputs" in msg


# --- other targets and the CLI ---------------------------------------------------------------


@pytest.mark.parametrize("targets", [["Valence"], [f"E{k}" for k in range(7)]])
def test_targets_come_from_the_header(raw_inputs, tmp_path: Path, targets: list[str]) -> None:
    inputs = raw_inputs(targets=targets)
    store = FeatureStore(pack(tmp_path / "store", inputs["splits"], inputs["modalities"],
                              targets=None, progress=False))
    assert store.targets == targets
    assert store.split("train").labels.shape == (6, len(targets))
    check_round_trip(store, inputs)


def test_cli_pack_and_info(raw_inputs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = raw_inputs()
    argv = [*cli_args(inputs, tmp_path / "store"), "--provenance.visual_model", "test-vit"]
    commands.pack_main(argv)
    out = capsys.readouterr().out
    assert "train: 6 clips, labelled" in out and "test: 3 clips, unlabelled" in out
    assert FeatureStore(tmp_path / "store").provenance["visual_model"] == "test-vit"
    with pytest.raises(StoreError, match="already exists"):
        commands.pack_main(argv)  # the store exists now
    commands.info_main([str(tmp_path / "store")])
    out = capsys.readouterr().out
    assert "visual (D=8), audio (D=12), text (D=16)" in out
    # the provenance, one short line per entry
    assert "           visual_model: test-vit" in out.splitlines()
    assert max(len(line) for line in out.splitlines()) < 140


def test_cli_pack_takes_a_config_file_as_its_flags(raw_inputs, tmp_path: Path, capsys) -> None:
    """--print_config writes the options; -c reads them back: the same store as the flags."""
    inputs = raw_inputs()
    flags = cli_args(inputs, tmp_path / "by_flags")
    with pytest.raises(SystemExit):
        commands.pack_main([*cli_args(inputs, tmp_path / "by_file"), "--print_config"])
    config = tmp_path / "pack.yaml"
    config.write_text(capsys.readouterr().out)
    assert not (tmp_path / "by_file").exists()  # printing the config did nothing else
    commands.pack_main(flags)
    commands.pack_main(["-c", str(config)])
    assert files_of(tmp_path / "by_file") == files_of(tmp_path / "by_flags")
    assert "splits:" in config.read_text() and "dest:" in config.read_text()
