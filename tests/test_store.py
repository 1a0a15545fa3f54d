"""Feature store format, reader and writer: exact pooled reads, presence, validation, resume."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from support.reference import torch_pool

from emimimic.data.store import (
    FeatureStore,
    SplitSpec,
    StoredClip,
    StoreError,
    StoreWriter,
    prepare_clip,
)

LENGTHS = (1, 7, 127, 128, 129, 1000)




def f16_values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Float16-representable float32 values over a wide range of magnitudes and signs."""
    scale = 10.0 ** rng.uniform(-4, 3, size=shape)
    return (rng.standard_normal(shape) * scale).astype(np.float16).astype(np.float32)


def build(dest: Path, clips: list[dict[str, np.ndarray | None]], dims: dict[str, int],
          targets: tuple[str, ...] = ("a", "b")) -> FeatureStore:
    ids = [f"{i:05d}" for i in range(len(clips))]
    labels = np.linspace(0, 1, len(clips) * len(targets)).reshape(len(clips), len(targets))
    writer = StoreWriter(dest, targets, dims, [SplitSpec("train", ids, labels)], {"test": True})
    for arrays in clips:
        writer.add("train", arrays)
    return FeatureStore(writer.finish())


def test_read_equals_adaptive_avg_pool_for_short_and_long_clips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raws = [f16_values(rng, (t, 24)) for t in LENGTHS]
    view = build(tmp_path / "s", [{"v": r} for r in raws], {"v": 24}).split("train")
    for i, raw in enumerate(raws):
        got = view.read("v", i)
        assert got.dtype == np.float16 and got.shape == (128, 24)
        np.testing.assert_array_equal(got.view(np.uint16), torch_pool(raw).view(np.uint16),
                                      err_msg=f"T={raw.shape[0]}")
    batch = view.read_batch("v", [5, 0, 2])
    np.testing.assert_array_equal(batch[0], torch_pool(raws[5]))
    np.testing.assert_array_equal(batch[1], torch_pool(raws[0]))


def test_negative_zeros_read_like_adaptive_pool(tmp_path: Path) -> None:
    raw = np.array([[-0.0, 1.0], [-0.0, -0.0], [2.0, -0.0]], dtype=np.float32)
    view = build(tmp_path / "s", [{"v": raw}], {"v": 2}).split("train")
    got = view.read("v", 0)
    np.testing.assert_array_equal(got.view(np.uint16), torch_pool(raw).view(np.uint16))


def test_storage_rule_short_raw_long_pooled(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    raws = [f16_values(rng, (t, 4)) for t in LENGTHS]
    build(tmp_path / "s", [{"v": r} for r in raws], {"v": 4})
    index = np.load(tmp_path / "s" / "train" / "v.index.npy")
    assert index[:, 2].tolist() == list(LENGTHS)
    assert index[:, 1].tolist() == [min(t, 128) for t in LENGTHS]
    assert index[:, 0].tolist() == np.concatenate([[0], np.cumsum(index[:-1, 1])]).tolist()
    size = (tmp_path / "s" / "train" / "v.f16").stat().st_size
    assert size == sum(min(t, 128) for t in LENGTHS) * 4 * 2
    # short clips are stored as their raw float16 rows
    data = np.fromfile(tmp_path / "s" / "train" / "v.f16", dtype=np.float16).reshape(-1, 4)
    np.testing.assert_array_equal(data[index[1, 0]:index[1, 0] + 7], raws[1].astype(np.float16))


def test_vector_counts_as_one_step(tmp_path: Path) -> None:
    vec = f16_values(np.random.default_rng(2), (6,))
    view = build(tmp_path / "s", [{"v": vec}], {"v": 6}).split("train")
    np.testing.assert_array_equal(view.read("v", 0), np.tile(vec.astype(np.float16), (128, 1)))


def test_absent_clip_reads_zero_and_not_present(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    clips = [{"a": f16_values(rng, (5, 3)), "t": None}, {"a": None, "t": f16_values(rng, (9, 2))}]
    view = build(tmp_path / "s", clips, {"a": 3, "t": 2}).split("train")
    assert view.present("a").tolist() == [True, False]
    assert view.present("t").tolist() == [False, True]
    assert not view.read("t", 0).any() and not view.read("a", 1).any()
    assert view.read("a", 0).any()
    assert view.raw_lengths("t").tolist() == [0, 9]


def test_labels_and_ids_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    s = build(tmp_path / "s", [{"v": f16_values(rng, (3, 2))} for _ in range(4)], {"v": 2})
    view = s.split("train")
    assert view.ids == ["00000", "00001", "00002", "00003"]
    expected = np.linspace(0, 1, 8).reshape(4, 2).astype(np.float32)
    np.testing.assert_array_equal(view.labels, expected)
    assert s.targets == ["a", "b"] and s.dims == {"v": 2} and s.splits == ["train"]


def test_folder_without_manifest_is_not_a_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    build(tmp_path / "s", [{"v": f16_values(rng, (3, 2))}], {"v": 2})
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore(tmp_path / "s")


def test_wrong_format_version_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    build(tmp_path / "s", [{"v": f16_values(rng, (3, 2))}], {"v": 2})
    path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="format_version 99"):
        FeatureStore(tmp_path / "s")


def test_truncated_data_file_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    build(tmp_path / "s", [{"v": f16_values(rng, (30, 2))}], {"v": 2})
    data = tmp_path / "s" / "train" / "v.f16"
    data.write_bytes(data.read_bytes()[:-4])
    with pytest.raises(StoreError, match="v.f16: expected 120 bytes"):
        FeatureStore(tmp_path / "s").split("train")


def test_unknown_split_and_modality_name_what_exists(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    s = build(tmp_path / "s", [{"v": f16_values(rng, (3, 2))}], {"v": 2})
    with pytest.raises(StoreError, match=r"split 'valid' not in the store \(it has \['train'\]\)"):
        s.split("valid")
    with pytest.raises(StoreError, match=r"modality 'text' not in the store"):
        s.split("train").read("text", 0)


def test_preload_reads_the_same(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    raws = [f16_values(rng, (t, 3)) for t in LENGTHS]
    view = build(tmp_path / "s", [{"v": r} for r in raws], {"v": 3}).split("train")
    mapped = view.read_batch("v", range(len(raws)))
    view.preload()
    assert "v" in view._preloaded
    np.testing.assert_array_equal(view.read_batch("v", range(len(raws))), mapped)


def test_read_rows_gives_stored_rows_back_to_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    raws = [f16_values(rng, (t, 6)) for t in LENGTHS] + [None, f16_values(rng, (3, 6))]
    clips = [{"v": r, "w": f16_values(rng, (2, 1))} for r in raws]  # "w": no clip is empty
    view = build(tmp_path / "s", clips, {"v": 6, "w": 1}).split("train")
    assert view.stored_rows("v").tolist() == [1, 7, 127, 128, 128, 128, 0, 3]
    data = np.fromfile(tmp_path / "s" / "train" / "v.f16", dtype=np.float16).reshape(-1, 6)
    index = np.load(tmp_path / "s" / "train" / "v.index.npy")
    for order in ([7, 0, 6, 5, 1], [2, 3, 4], [6], [1, 1, 0], list(range(8))):
        expected = np.concatenate([data[index[i, 0]:index[i, 0] + index[i, 1]] for i in order])
        got = view.read_rows("v", order)
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))
        out = np.full_like(expected, np.nan)
        assert view.read_rows("v", order, out=out) is out
        np.testing.assert_array_equal(out, expected)
    # stored rows of a long clip are its pooled rows, of a short one its raw rows
    np.testing.assert_array_equal(view.read_rows("v", [4]), torch_pool(raws[4]))
    np.testing.assert_array_equal(view.read_rows("v", [1]), raws[1].astype(np.float16))
    view.preload()
    np.testing.assert_array_equal(view.read_rows("v", [7, 0, 5]),
                                  np.concatenate([data[-3:], data[:1], data[391:519]]))


def test_read_rows_checks_its_output_and_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    view = build(tmp_path / "s", [{"v": f16_values(rng, (t, 2))} for t in (4, 5)],
                 {"v": 2}).split("train")
    with pytest.raises(StoreError, match=r"v.f16: read_rows needs a C-contiguous float16 \[9, 2\]"):
        view.read_rows("v", [0, 1], out=np.empty((8, 2), np.float16))
    view.read_rows("v", [0])  # opens the file
    data = tmp_path / "s" / "train" / "v.f16"
    data.write_bytes(data.read_bytes()[:-4])  # the store changes under the open reader
    with pytest.raises(StoreError, match="v.f16: file ends at byte 32 inside clip 00001"):
        view.read_rows("v", [1])


def test_byte_ranges_and_prefetch_cover_exactly_the_stored_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(14)
    raws = [f16_values(rng, (t, 4)) for t in (3, 200, 5)] + [None, f16_values(rng, (2, 4))]
    view = build(tmp_path / "s", [{"v": r, "w": f16_values(rng, (1, 2))} for r in raws],
                 {"v": 4, "w": 2}).split("train")
    # rows: clip 0 [0, 3), 1 [3, 131), 2 [131, 136), 3 absent, 4 [136, 138); 8 bytes a row
    assert view.byte_ranges("v", [4, 0, 1, 0]) == [(0, 131 * 8), (136 * 8, 2 * 8)]
    assert view.byte_ranges("v", [2, 3, 4]) == [(131 * 8, 7 * 8)]  # the absent clip spans nothing
    assert view.byte_ranges("v", [3]) == [] and view.byte_ranges("v", []) == []
    assert view.byte_ranges("w", [4, 2]) == [(2 * 4, 4), (4 * 4, 4)]
    calls: list[tuple[str, int, int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: calls.append(
        (os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, length, advice)))
    # "w" has a row for every clip, so clips 3 and 4 touch there
    assert view.prefetch(["v", "w"], [0, 4, 3]) == 3 * 8 + 2 * 8 + 3 * 4
    will = os.POSIX_FADV_WILLNEED
    assert calls == [("v.f16", 0, 24, will), ("v.f16", 136 * 8, 16, will),
                     ("w.f16", 0, 4, will), ("w.f16", 12, 8, will)]
    calls.clear()
    view.preload(["v"])
    assert view.prefetch(["v"], [0, 1]) == 0 and calls == []  # nothing to fetch from disk


def test_view_pickles_without_open_files_after_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(15)
    raws = [f16_values(rng, (t, 3)) for t in (4, 150)]
    view = build(tmp_path / "s", [{"v": r} for r in raws], {"v": 3}).split("train")
    before = view.read_rows("v", [1, 0])
    view.prefetch(["v"], [0, 1])
    view.read("v", 0)
    assert view._files  # opened by the reads
    clone = pickle.loads(pickle.dumps(view))
    assert clone._files == {}
    np.testing.assert_array_equal(clone.read_rows("v", [1, 0]), before)
    np.testing.assert_array_equal(clone.read("v", 1), view.read("v", 1))
    assert view._files  # the original keeps its own


def test_all_rows_and_row_starts_follow_the_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(16)
    raws = [f16_values(rng, (t, 3)) for t in (4, 200)] + [None, f16_values(rng, (2, 3))]
    view = build(tmp_path / "s", [{"v": r, "w": f16_values(rng, (1, 1))} for r in raws],
                 {"v": 3, "w": 1}).split("train")
    data = np.fromfile(tmp_path / "s" / "train" / "v.f16", dtype=np.float16).reshape(-1, 3)
    np.testing.assert_array_equal(view.all_rows("v"), data)
    assert view.all_rows("v").shape == (4 + 128 + 2, 3)
    assert view.row_starts("v").tolist() == [0, 4, 132, 132]
    for i in (0, 1, 3):
        start, rows = view.row_starts("v")[i], view.stored_rows("v")[i]
        np.testing.assert_array_equal(view.all_rows("v")[start:start + rows],
                                      view.read_rows("v", [i]))


def test_missing_store_says_it_does_not_exist_and_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"nothing: feature store does not exist; build one"):
        FeatureStore(tmp_path / "nothing")
    (tmp_path / "half.partial").mkdir()
    with pytest.raises(StoreError, match=r"an unfinished build is in .*half\.partial"):
        FeatureStore(tmp_path / "half")


def writer_for(dest: Path, n: int = 3) -> StoreWriter:
    ids = [f"{i:05d}" for i in range(n)]
    return StoreWriter(dest, ("a",), {"v": 2, "w": 3},
                       [SplitSpec("train", ids, np.zeros((n, 1)))], {"test": True})


def test_writer_counts_clips_and_refuses_to_finish_early(tmp_path: Path) -> None:
    writer = writer_for(tmp_path / "s")
    assert writer.done("train") == 0 and writer.next_clip("train") == "00000"
    writer.add("train", {"v": np.ones((3, 2)), "w": None})
    assert writer.done("train") == 1 and writer.next_clip("train") == "00001"
    with pytest.raises(StoreError, match=r"1 of 3 clips written; cannot finish"):
        writer.finish()
    for _ in range(2):
        writer.add("train", {"v": None, "w": np.ones((1, 3))})
    with pytest.raises(StoreError, match="all 3 clips already written"):
        writer.next_clip("train")
    store = FeatureStore(writer.finish())
    assert store.manifest["splits"]["train"]["present"] == {"v": 1, "w": 2}


def test_invalid_clip_writes_nothing(tmp_path: Path) -> None:
    writer = writer_for(tmp_path / "s", n=1)
    with pytest.raises(StoreError, match=r"<generated> \(clip 00000, modality w\): expected D = 3"):
        writer.add("train", {"v": np.ones((2, 2)), "w": np.ones((2, 4))})
    with pytest.raises(StoreError, match=r"clip 00000: no features in any modality"):
        writer.add("train", {"v": None, "w": None})
    assert writer.done("train") == 0
    assert (tmp_path / "s.partial" / "train" / "v.f16").stat().st_size == 0
    writer.add("train", {"v": np.ones((2, 2)), "w": None})
    view = FeatureStore(writer.finish()).split("train")
    assert view.stored_rows("v").tolist() == [2] and view.stored_rows("w").tolist() == [0]


def test_append_of_prepared_clips_equals_add(tmp_path: Path) -> None:
    rng = np.random.default_rng(17)
    clips = [{"v": f16_values(rng, (t, 2)), "w": f16_values(rng, (1, 3))} for t in (5, 300)]
    clips.append({"v": None, "w": f16_values(rng, (130, 3))})
    added, appended = writer_for(tmp_path / "a"), writer_for(tmp_path / "b")
    for arrays in clips:
        added.add("train", arrays)
        prepared = prepare_clip(arrays, {"v": 2, "w": 3}, appended.next_clip("train"))
        assert isinstance(prepared, StoredClip)
        assert prepared.raw_lengths == {m: 0 if a is None else a.shape[0]
                                        for m, a in arrays.items()}
        appended.append("train", prepared)
    a, b = added.finish(), appended.finish()
    assert {p.relative_to(a): p.read_bytes() for p in a.rglob("*") if p.is_file()} == \
        {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()}


def test_a_new_writer_continues_where_the_last_stopped(tmp_path: Path) -> None:
    rng = np.random.default_rng(18)
    clips = [{"v": f16_values(rng, (t, 2)), "w": None} for t in (3, 200, 1)]
    first = writer_for(tmp_path / "s")
    first.add("train", clips[0])
    first.close()  # interrupted after one clip
    second = writer_for(tmp_path / "s")
    assert second.done("train") == 1
    for arrays in clips[1:]:
        second.add("train", arrays)
    view = FeatureStore(second.finish()).split("train")
    for i, arrays in enumerate(clips):
        np.testing.assert_array_equal(view.read("v", i), torch_pool(arrays["v"]))
