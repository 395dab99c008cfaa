import os
import time

import numpy as np
import pytest
from conftest import CLASSES, class_image, make_dataset
from PIL import Image

from asl_tune.data import find_class_root, frame_number, load_dataset, load_external, make_splits, subsample
from asl_tune.errors import AslTuneError


def test_seed_split_sizes_on_the_full_dataset_shape():
    # 29 classes x 3000 frames, as the Kaggle set: the seed's 60,900 / 17,400 / 8,700.
    labels = np.repeat(np.arange(29), 3000)
    frames = np.tile(np.arange(1, 3001), 29)
    for mode in ("blocked", "random"):
        s = make_splits(labels, frames, mode, seed=0)
        assert (len(s.train), len(s.val), len(s.test)) == (60_900, 17_400, 8_700)
        assert len(np.unique(np.concatenate([s.train, s.val, s.test]))) == 87_000
        assert (np.bincount(labels[s.train]) == 2100).all()


def test_blocked_split_keeps_frame_blocks_contiguous():
    labels = np.repeat(np.arange(3), 3000)
    frames = np.tile(np.random.default_rng(0).permutation(np.arange(1, 3001)), 3)  # files listed out of order
    s = make_splits(labels, frames, "blocked", seed=0)
    for c in range(3):
        tr = frames[s.train][labels[s.train] == c]
        va = frames[s.val][labels[s.val] == c]
        te = frames[s.test][labels[s.test] == c]
        assert (tr.min(), tr.max()) == (1, 2100)
        assert (va.min(), va.max()) == (2101, 2700)
        assert (te.min(), te.max()) == (2701, 3000)


def test_random_split_mixes_neighbouring_frames_and_is_seeded():
    labels = np.repeat(np.arange(2), 100)
    frames = np.tile(np.arange(1, 101), 2)
    a, b = make_splits(labels, frames, "random", 1), make_splits(labels, frames, "random", 1)
    assert np.array_equal(a.test, b.test)
    assert frames[a.test].max() - frames[a.test].min() > 50  # spread over the whole video
    assert not np.array_equal(a.test, make_splits(labels, frames, "random", 2).test)


def test_fraction_subsamples_train_only_and_stratified():
    labels = np.repeat(np.arange(29), 3000)
    frames = np.tile(np.arange(1, 3001), 29)
    s = make_splits(labels, frames, "blocked", seed=0)
    small = subsample(s.train, labels, 0.35, seed=0)
    assert len(small) == 29 * 735
    assert set(small) <= set(s.train)
    assert (np.bincount(labels[small]) == 735).all()
    # Validation and test do not depend on the fraction: trials are compared on the same images.
    assert np.array_equal(make_splits(labels, frames, "blocked", 0).val, s.val)
    assert np.array_equal(subsample(s.train, labels, 0.35, seed=0), small)


def test_frame_number_is_the_last_number_in_the_stem():
    assert frame_number("M895.jpg") == 895
    assert frame_number("space12.jpg") == 12
    assert frame_number("nothing.jpg") == -1


def test_kaggle_layout_at_every_nesting_level(tiny_dataset):
    inner = tiny_dataset / "asl_alphabet_train" / "asl_alphabet_train"
    for given in (tiny_dataset, tiny_dataset / "asl_alphabet_train", inner):
        assert find_class_root(given) == inner


def test_decoded_array_matches_files_and_class_order(tiny_dataset):
    ds = load_dataset(tiny_dataset, 32, progress=False, workers=1)
    assert ds.classes == sorted(CLASSES)  # ImageFolder order: upper case before lower case
    assert ds.images.shape == (60, 32, 32, 3) and ds.images.dtype == np.uint8
    assert ds.class_counts() == {c: 12 for c in CLASSES}
    i = ds.paths.index(os.path.join("del", "del7.jpg"))
    assert ds.labels[i] == ds.classes.index("del") and ds.frames[i] == 7
    expected = np.asarray(
        Image.open(tiny_dataset / "asl_alphabet_train/asl_alphabet_train/del/del7.jpg").convert("RGB").resize((32, 32), Image.BILINEAR),
        dtype=np.int16,
    )
    assert np.abs(ds.images[i].astype(np.int16) - expected).mean() < 6  # draft-mode decode, same picture


def test_cache_built_once_reused_and_rebuilt_on_change(tiny_dataset, monkeypatch):
    first = load_dataset(tiny_dataset, 32, progress=False, workers=2)  # parallel build
    assert isinstance(first.images, np.memmap)
    calls = []
    import asl_tune.data as data

    real = data._decode_all
    monkeypatch.setattr(data, "_decode_all", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = load_dataset(tiny_dataset, 32, progress=False)
    assert calls == [] and again.fingerprint == first.fingerprint
    assert np.array_equal(np.asarray(again.images), np.asarray(first.images))
    # Rewrite one file with different content: the fingerprint changes and the cache is rebuilt.
    target = tiny_dataset / "asl_alphabet_train/asl_alphabet_train/A/A1.jpg"
    time.sleep(0.01)
    class_image(4, 99, 48).save(target, quality=50)
    changed = load_dataset(tiny_dataset, 32, progress=False, workers=1)
    assert calls == [1] and changed.fingerprint != first.fingerprint
    assert not np.array_equal(np.asarray(changed.images[0]), np.asarray(first.images[0]))
    # Another size is another cache entry.
    assert load_dataset(tiny_dataset, 40, progress=False, workers=1).images.shape[1] == 40


def test_messy_files_are_handled_and_bad_ones_skipped_by_name(tiny_dataset):
    a = tiny_dataset / "asl_alphabet_train/asl_alphabet_train/A"
    (a / ".DS_Store").write_bytes(b"\x00\x01junk")
    (a / "Thumbs.db").write_bytes(b"junk")
    (a / "notes.txt").write_text("not an image")
    Image.new("L", (50, 40), 128).save(a / "A100.jpg")  # grayscale JPEG
    Image.new("CMYK", (40, 50), (0, 50, 100, 0)).save(a / "A101.jpg")  # CMYK JPEG
    Image.new("RGBA", (48, 48), (10, 20, 30, 128)).save(a / "A102.png")  # PNG with alpha
    good = (a / "A1.jpg").read_bytes()
    (a / "A103.jpg").write_bytes(good[: len(good) // 3])  # truncated download
    (a / "A104.jpg").write_bytes(b"this is not a jpeg")  # unreadable
    ds = load_dataset(tiny_dataset, 32, progress=False, workers=1)
    assert ds.class_counts()["A"] == 15
    assert sorted(p for p, _ in ds.skipped) == [os.path.join("A", "A103.jpg"), os.path.join("A", "A104.jpg")]
    cmyk = ds.images[ds.paths.index(os.path.join("A", "A101.jpg"))]
    assert cmyk.shape == (32, 32, 3)


def test_missing_folder_refused(tmp_path):
    with pytest.raises(AslTuneError, match=r"--data: folder does not exist: .*nowhere"):
        load_dataset(tmp_path / "nowhere", 32)


def test_folder_without_class_folders_refused(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.jpg")
    (tmp_path / "flat" / "a").mkdir()
    (tmp_path / "flat" / "b").mkdir()
    with pytest.raises(AslTuneError, match="--data: no class folders"):
        load_dataset(tmp_path / "flat", 32)


def test_class_without_readable_image_refused(tiny_dataset):
    b = tiny_dataset / "asl_alphabet_train/asl_alphabet_train/B"
    for f in b.iterdir():
        f.write_bytes(b"broken")
    with pytest.raises(AslTuneError, match="class folder\\(s\\) with no readable image: B"):
        load_dataset(tiny_dataset, 32, progress=False, workers=1)


def test_external_kaggle_test_folder_and_folder_per_class(tiny_dataset, tmp_path):
    ds = load_dataset(tiny_dataset, 32, progress=False, workers=1)
    flat = tmp_path / "asl_alphabet_test" / "asl_alphabet_test"
    flat.mkdir(parents=True)
    for label, c in enumerate(CLASSES):
        if c != "del":  # the real test folder has no del_test.jpg
            class_image(label, 500).save(flat / f"{c}_test.jpg")
    ext = load_external(tmp_path, ds.classes, 32, progress=False)
    assert len(ext.labels) == 4 and sorted(ext.classes[k] for k in ext.labels) == ["A", "B", "C", "nothing"]
    per_class = make_dataset(tmp_path / "other", per_class=2, classes=["B", "nothing"])
    ext2 = load_external(per_class, ds.classes, 32, progress=False)
    assert sorted(set(ds.classes[k] for k in ext2.labels)) == ["B", "nothing"]


def test_external_with_unknown_class_refused(tiny_dataset, tmp_path):
    ds = load_dataset(tiny_dataset, 32, progress=False, workers=1)
    other = make_dataset(tmp_path / "other", per_class=1, classes=["Q"])
    with pytest.raises(AslTuneError, match="--external: class folder\\(s\\) not among the training classes: Q"):
        load_external(other, ds.classes, 32, progress=False)


# ---------------------------------------------------------------- batches


def _images(n: int = 6, size: int = 8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)  # (N, S, S, 3)


def test_a_cpu_batcher_never_pins_memory(monkeypatch):
    """Pinned memory needs CUDA: on the CPU the batch is cut from the array as it is."""
    import torch

    from asl_tune.data import Batcher

    real_empty = torch.empty

    def refuse_pinning(*args, pin_memory=False, **kwargs):
        assert not pin_memory, "a CPU batch asked for pinned memory"
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", refuse_pinning)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pytest.fail("a CPU batch pinned memory"))
    images = _images()
    batcher = Batcher(images, torch.device("cpu"), channels_last=False)
    assert not batcher.pinned
    x = batcher.batch(torch.tensor([4, 1]))
    assert x.shape == (2, 3, 8, 8) and x.device.type == "cpu"
    expected = Batcher(images[[4, 1]], torch.device("cpu"), channels_last=False).batch(torch.arange(2))
    assert torch.equal(x, expected)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_a_gpu_batcher_that_keeps_the_array_on_the_host_copies_through_pinned_memory():
    import torch

    from asl_tune.data import Batcher

    images = _images(64)
    device = torch.device("cuda")
    streamed, resident = Batcher(images, device, channels_last=True), Batcher(images, device, channels_last=True)
    resident.to_device()
    assert streamed.pinned and not resident.pinned
    batches = [torch.randperm(64)[:16] for _ in range(8)]
    out = [streamed.batch(rows) for rows in batches]  # several in flight: none may overwrite another's staging buffer
    torch.cuda.synchronize()
    for rows, x in zip(batches, out):
        assert x.device.type == "cuda" and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, resident.batch(rows))


def test_a_batcher_reads_the_cache_files_rows_with_pread_and_gives_the_same_batches(tmp_path, monkeypatch):
    import torch

    from asl_tune.data import Batcher

    images = np.random.default_rng(0).integers(0, 256, size=(40, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    from_file, in_memory = Batcher(mapped, torch.device("cpu"), False), Batcher(images.copy(), torch.device("cpu"), False)
    assert from_file.file is not None and in_memory.file is None
    for rows in ([3, 4, 5, 6], [39, 0, 17, 17, 2], list(range(40)), [7], []):  # runs, repeats, the ends, none
        r = torch.tensor(rows, dtype=torch.int64)
        assert torch.equal(from_file.batch(r), in_memory.batch(r)), rows
    with pytest.raises(IndexError, match="40 is out of range for 40 rows"):
        from_file.batch(torch.tensor([1, 40]))
    assert Batcher(mapped[:10], torch.device("cpu"), False).file is None  # a view of a mapping is not the whole file: indexed
    monkeypatch.setattr("asl_tune.data.TO_DEVICE_CHUNK_BYTES", 7 * 8 * 8 * 3)  # 7 rows a chunk: 6 chunks, the last short
    resident = Batcher(mapped, torch.device("cpu"), False)
    resident.to_device()  # as on a GPU: the whole file read onto the device, a chunk at a time
    assert resident.file is None and torch.equal(resident.images, torch.from_numpy(images))
    assert torch.equal(resident.batch(torch.tensor([39, 0, 5])), in_memory.batch(torch.tensor([39, 0, 5])))


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_reading_every_row_of_the_cache_file_leaves_none_of_its_pages_in_the_process(tmp_path):
    """The rows stay in the page cache, shared, not in the trial's own memory (the issue on the real dataset size)."""
    import torch

    from asl_tune.data import Batcher, mapped_bytes

    path = tmp_path / "images.npy"
    np.save(path, np.random.default_rng(1).integers(0, 256, size=(512, 64, 64, 3), dtype=np.uint8))  # 6 MB
    mapped = np.load(path, mmap_mode="r")
    batcher = Batcher(mapped, torch.device("cpu"), False)
    for s in range(0, 512, 64):
        batcher.batch(torch.arange(s, s + 64))
    assert mapped_bytes(path) < 64 * 1024  # the header page at most
    mapped[np.arange(0, 512, 2)].sum()  # the same rows read through the mapping do stay mapped: the measure can tell
    assert mapped_bytes(path) > 3_000_000
