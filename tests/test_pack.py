"""``emimimic pack``: round trips, one clear error per bad input, safe pickles, resumable runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emimimic.constants import EMOTIONS
from emimimic.data import commands
from emimimic.data import pack as pack_mod
from emimimic.data.pack import pack
from emimimic.data.store import FeatureStore, StoreError


def torch_pool(raw: np.ndarray) -> np.ndarray:
    return F.adaptive_avg_pool1d(torch.from_numpy(raw).T[None].float(), 128)[0].T.half().numpy()


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


def test_missing_file_is_an_error_by_default(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    (Path(inputs["modalities"]["text"]) / "00002.npy").unlink()
    msg = pack_error(inputs, tmp_path / "store")
    assert "text/00002.npy" in msg and "clip 00002" in msg and "missing feature file" in msg
    assert not Path(f"{tmp_path / 'store'}.partial").exists()  # failed before any writing


def test_wrong_dim(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    bad = Path(inputs["modalities"]["audio"]) / "00003.npy"
    np.save(bad, np.zeros((5, 11), dtype=np.float32))
    msg = pack_error(inputs, tmp_path / "store")
    assert str(bad) in msg and "clip 00003" in msg and "expected D = 12" in msg


def test_wrong_ndim(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    bad = Path(inputs["modalities"]["visual"]) / "00004.npy"
    np.save(bad, np.zeros((2, 5, 8), dtype=np.float32))
    msg = pack_error(inputs, tmp_path / "store")
    assert str(bad) in msg and "clip 00004" in msg and "ndim 3" in msg


def test_empty_array(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    bad = Path(inputs["modalities"]["visual"]) / "00001.npy"
    np.save(bad, np.zeros((0, 8), dtype=np.float32))
    msg = pack_error(inputs, tmp_path / "store")
    assert str(bad) in msg and "clip 00001" in msg and "empty array" in msg


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf(raw_inputs, tmp_path: Path, value: float) -> None:
    inputs = raw_inputs()
    bad = Path(inputs["modalities"]["text"]) / "00007.npy"
    arr = np.ones((4, 16), dtype=np.float32)
    arr[2, 3] = value
    np.save(bad, arr)
    msg = pack_error(inputs, tmp_path / "store")
    assert str(bad) in msg and "clip 00007" in msg and "NaN or Inf" in msg


def test_label_outside_unit_interval(raw_inputs, split_csv, tmp_path: Path) -> None:
    inputs = raw_inputs()
    labels = inputs["labels"]["valid"].copy()
    labels[1, 4] = 1.5
    split_csv(Path(inputs["splits"]["valid"]), range(6, 10), labels)
    msg = pack_error(inputs, tmp_path / "store")
    assert "valid.csv, line 3, clip 00007, column 'Excitement'" in msg and "outside [0, 1]" in msg


def test_missing_label(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    csv = Path(inputs["splits"]["train"])
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ","  # clip 00001 loses its Joy value
    csv.write_text("\n".join(lines) + "\n")
    msg = pack_error(inputs, tmp_path / "store")
    assert "train.csv, line 3, clip 00001, column 'Joy'" in msg and "missing label" in msg


def test_nan_label(raw_inputs, split_csv, tmp_path: Path) -> None:
    inputs = raw_inputs()
    labels = inputs["labels"]["train"].copy()
    labels[0, 0] = np.nan
    split_csv(Path(inputs["splits"]["train"]), range(6), labels)
    msg = pack_error(inputs, tmp_path / "store")
    assert "clip 00000, column 'Admiration'" in msg and "missing label (NaN)" in msg


def test_wrong_header(raw_inputs, split_csv, tmp_path: Path) -> None:
    inputs = raw_inputs()
    names = [*EMOTIONS[:3], "Empathic_Pain", *EMOTIONS[4:]]
    split_csv(Path(inputs["splits"]["train"]), range(6), inputs["labels"]["train"], names)
    msg = pack_error(inputs, tmp_path / "store")
    assert "train.csv" in msg and "Empathic_Pain" in msg and "expected" in msg


def test_duplicate_id_in_a_split(raw_inputs, split_csv, tmp_path: Path) -> None:
    inputs = raw_inputs()
    split_csv(Path(inputs["splits"]["train"]), [0, 1, 2, 3, 1, 5], inputs["labels"]["train"])
    msg = pack_error(inputs, tmp_path / "store")
    assert "train.csv, line 6: duplicate clip id 00001 (first on line 3)" in msg


def test_duplicate_id_across_splits(raw_inputs, split_csv, tmp_path: Path) -> None:
    inputs = raw_inputs()
    split_csv(Path(inputs["splits"]["test"]), [10, 11, 3], None)
    msg = pack_error(inputs, tmp_path / "store")
    assert "test.csv: clip id 00003 also appears in split 'train'" in msg


def test_id_without_features_in_any_modality(raw_inputs, split_csv, tmp_path: Path) -> None:
    inputs = raw_inputs()
    split_csv(Path(inputs["splits"]["test"]), [10, 11, 12, 99], None)
    msg = pack_error(inputs, tmp_path / "store", missing="absent")
    assert "clip 00099" in msg and "test.csv" in msg and "no feature file in any modality" in msg


def test_existing_destination(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    (tmp_path / "store").mkdir()
    msg = pack_error(inputs, tmp_path / "store")
    assert str(tmp_path / "store") in msg and "already exists" in msg


def test_both_npy_and_pkl_is_ambiguous(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    folder = Path(inputs["modalities"]["audio"])
    (folder / "00002.pkl").write_bytes(pickle.dumps(np.load(folder / "00002.npy")))
    msg = pack_error(inputs, tmp_path / "store")
    assert "00002.npy" in msg and "00002.pkl" in msg and "two feature files for clip 00002" in msg


def test_npy_holding_objects_is_refused(raw_inputs, tmp_path: Path) -> None:
    inputs = raw_inputs()
    bad = Path(inputs["modalities"]["audio"]) / "00005.npy"
    np.save(bad, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    msg = pack_error(inputs, tmp_path / "store")
    assert str(bad) in msg and "without pickles" in msg


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
    with pytest.raises(StoreError, match="not a feature store"):
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
    stems = sorted(set(loaded) - {"00000"})  # 00000 is read once more to learn each dim
    assert stems == [f"{i:05d}" for i in range(8, 13)]  # train and clips 6, 7 were not redone
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
    argv = ["pack", str(tmp_path / "store"), "--quiet", "--provenance", "visual_model=test-vit"]
    for name, path in inputs["splits"].items():
        argv += ["--split", f"{name}={path}"]
    for m, path in inputs["modalities"].items():
        argv += ["--modality", f"{m}={path}"]
    commands.main(argv)
    out = capsys.readouterr().out
    assert "train: 6 clips, labelled" in out and "test: 3 clips, unlabelled" in out
    assert FeatureStore(tmp_path / "store").provenance["visual_model"] == "test-vit"
    with pytest.raises(SystemExit) as exit_info:
        commands.main(argv)  # the store exists now
    assert exit_info.value.code == 2
    assert "already exists" in capsys.readouterr().err
    commands.main(["info", str(tmp_path / "store")])
    assert "visual (D=8), audio (D=12), text (D=16)" in capsys.readouterr().out
