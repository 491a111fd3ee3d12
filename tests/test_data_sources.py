"""Readers: folder, tar, parquet, and the packaged sets on tiny fake files laid out like the packages."""

import csv
import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from micro_diffusion.data.sources import SourceUnavailableError, available_sources, get_source
from micro_diffusion.data.sources.clipart import CLIPART_DIR, caption_from_path, iter_clipart
from micro_diffusion.data.sources.emoji import iter_emoji
from micro_diffusion.data.sources.fashion_mnist import FASHION_MNIST_DIR, iter_fashion_mnist
from micro_diffusion.data.sources.folder import iter_folder
from micro_diffusion.data.sources.tar import iter_tar


def png_bytes(
    colour: tuple[int, ...] = (255, 0, 0), size: tuple[int, int] = (8, 6), mode: str = "RGB"
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_registry_lists_every_reader():
    assert {"folder", "tar", "parquet", "emoji", "fashion_mnist", "clipart", "shapes"} <= set(
        available_sources()
    )
    with pytest.raises(KeyError, match="unknown source 'nope'"):
        get_source("nope")


# --- folder -----------------------------------------------------------------------------------------------


def test_folder_sidecar_captions_and_subfolder_labels(tmp_path):
    for name, caption in [("dog/b.png", "a dog"), ("cat/a.png", "a cat"), ("cat/c.jpg", None)]:
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png_bytes())
        if caption is not None:
            path.with_suffix(".txt").write_text(caption + "\n")
    records = list(iter_folder(tmp_path, labels_from_subfolders=True))
    assert [(r.key, r.caption, r.label) for r in records] == [
        ("cat/a.png", "a cat", 0),
        ("cat/c.jpg", "", 0),
        ("dog/b.png", "a dog", 1),
    ]
    assert records[0].image is None and records[0].open_image().size == (8, 6)


def test_folder_jsonl_and_csv_manifests(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(png_bytes())
    rows = [
        {"file": "imgs/x.png", "text": "red", "cls": 3, "nsfw": 0.5},
        {"file": "imgs/gone.png", "text": "b"},
    ]
    jsonl = tmp_path / "meta.jsonl"
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    records = list(
        iter_folder(
            tmp_path,
            jsonl,
            image_column="file",
            caption_column="text",
            label_column=None,
            extra_columns=["nsfw"],
        )
    )
    assert [(r.key, r.caption, r.extra) for r in records] == [
        ("imgs/x.png", "red", {"nsfw": 0.5}),
        ("imgs/gone.png", "b", {"nsfw": None}),
    ]
    assert records[1].encoded == b""  # missing file: passed on, counted by convert as "missing image"

    table = tmp_path / "meta.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "text", "cls"])
        writer.writeheader()
        writer.writerow({"file": "imgs/x.png", "text": "red", "cls": "3"})
    (record,) = iter_folder(tmp_path, table, image_column="file", caption_column="text", label_column="cls")
    assert (record.caption, record.label, record.encoded) == ("red", 3, png_bytes())


def test_folder_coco_captions_manifest_takes_first_caption(tmp_path):
    (tmp_path / "COCO_val2014_1.jpg").write_bytes(png_bytes())
    coco = {
        "images": [{"id": 1, "file_name": "COCO_val2014_1.jpg"}],
        "annotations": [
            {"id": 9, "image_id": 1, "caption": "second"},
            {"id": 4, "image_id": 1, "caption": "first"},
        ],
    }
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    (record,) = iter_folder(tmp_path, tmp_path / "captions_val2014.json")
    assert (record.key, record.caption) == ("COCO_val2014_1.jpg", "first")


def test_folder_refuses_paths_outside_root_and_bad_rows(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "../secret.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="outside the image folder"):
        list(iter_folder(root, manifest))
    manifest.write_text(json.dumps({"caption": "no image"}) + "\n")
    with pytest.raises(ValueError, match=r"m.jsonl row 1: no image path in column 'image'"):
        list(iter_folder(root, manifest))
    manifest.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        list(iter_folder(root, manifest))


# --- tar --------------------------------------------------------------------------------------------------


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_tar_groups_members_by_key(tmp_path):
    write_tar(
        tmp_path / "shard-0000.tar",
        {
            "000.jpg": png_bytes(),
            "000.txt": b"a red square",
            "000.json": json.dumps({"caption": "from json", "nsfw": 0.1}).encode(),
            "000.cls": b"7",
            "001.png": png_bytes((0, 0, 255)),
            "001.txt": b" a blue square \n",
            "002.txt": b"caption without image",
        },
    )
    records = list(iter_tar(str(tmp_path / "*.tar")))
    assert [(r.key, r.caption, r.label) for r in records] == [
        ("shard-0000.tar/000", "a red square", 7),
        ("shard-0000.tar/001", "a blue square", -1),
        ("shard-0000.tar/002", "caption without image", -1),
    ]
    assert records[1].encoded == png_bytes((0, 0, 255)) and records[2].encoded == b""
    (first, *_) = iter_tar(
        tmp_path / "shard-0000.tar", caption_json_field="caption", extra_json_fields=["nsfw"]
    )
    assert (first.caption, first.extra) == ("from json", {"nsfw": 0.1})


def test_tar_captions_from_a_separate_folder(tmp_path):
    write_tar(tmp_path / "sa_000000.tar", {"sa_1.jpg": png_bytes(), "sa_1.json": b"{}"})
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "sa_1.txt").write_text("a llava caption")
    (record,) = iter_tar(tmp_path / "sa_000000.tar", caption_dir=tmp_path / "captions")
    assert record.caption == "a llava caption"


def test_tar_errors_name_the_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tar shard file matches"):
        list(iter_tar(str(tmp_path / "missing-*.tar")))
    good = write_tar(tmp_path / "good.tar", {"000.png": png_bytes(size=(64, 64)), "000.txt": b"x" * 5000})
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[:700])
    with pytest.raises(ValueError, match="truncated.tar is unreadable or truncated"):
        list(iter_tar(truncated))


# --- parquet ----------------------------------------------------------------------------------------------


def test_parquet_bytes_and_struct_images(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from micro_diffusion.data.sources.parquet import iter_parquet

    table = pa.table(
        {
            "image": [{"bytes": png_bytes(), "path": "a.png"}, {"bytes": None, "path": None}],
            "reference_strs": [["first", "second"], []],
            "id": ["a", "b"],
        }
    )
    pq.write_table(table, tmp_path / "train-0.parquet")
    records = list(
        iter_parquet(str(tmp_path / "*.parquet"), caption_column="reference_strs", key_column="id")
    )
    assert [(r.key, r.caption, r.encoded) for r in records] == [("a", "first", png_bytes()), ("b", "", b"")]
    with pytest.raises(KeyError, match=r"missing column\(s\) \['caption'\]"):
        list(iter_parquet(tmp_path / "train-0.parquet"))


# --- packaged sources -------------------------------------------------------------------------------------


def fake_emoji_package(root: Path) -> Path:
    """emoji.json + img/google/64/*.png laid out as in the npm package."""
    (root / "img" / "google" / "64").mkdir(parents=True)
    entries = [
        {"name": "GRINNING FACE", "unified": "1F600", "image": "1f600.png", "category": "Smileys & Emotion"},
        {
            "name": "WAVING HAND SIGN",
            "unified": "1F44B",
            "image": "1f44b.png",
            "category": "People & Body",
            "subcategory": "hand-fingers-open",
            "skin_variations": {
                "1F3FB": {"unified": "1F44B-1F3FB", "image": "1f44b-1f3fb.png", "has_img_google": True},
                "1F3FF": {"unified": "1F44B-1F3FF", "image": "1f44b-1f3ff.png", "has_img_google": False},
            },
        },
    ]
    (root / "emoji.json").write_text(json.dumps(entries))
    for name in ("1f600.png", "1f44b.png", "1f44b-1f3fb.png"):
        (root / "img" / "google" / "64" / name).write_bytes(png_bytes((0, 0, 0, 0), (64, 64), "RGBA"))
    return root


def test_emoji_reader_on_the_package_layout(tmp_path):
    records = list(iter_emoji(fake_emoji_package(tmp_path)))
    assert [(r.key, r.caption, r.label) for r in records] == [
        ("1F600", "an emoji of grinning face", 1),
        ("1F44B", "an emoji of waving hand sign", 0),
        ("1F44B-1F3FB", "an emoji of waving hand sign, light skin tone", 0),
    ]
    assert records[0].open_image().mode == "RGBA"
    assert len(list(iter_emoji(tmp_path, include_skin_tones=False))) == 2


def test_emoji_reader_says_how_to_install(tmp_path):
    with pytest.raises(SourceUnavailableError, match="scripts/get_offline_data.sh emoji"):
        list(iter_emoji(tmp_path / "absent"))


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_reader_on_idx_files(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 2051)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 3]), 2049)
    records = list(iter_fashion_mnist(tmp_path, split="test"))
    assert [(r.key, r.caption, r.label) for r in records] == [
        ("test/00000", "a photo of an ankle boot", 9),
        ("test/00001", "a photo of a T-shirt", 0),
        ("test/00002", "a photo of a dress", 3),
    ]
    np.testing.assert_array_equal(np.asarray(records[2].image), images[2])
    with pytest.raises(SourceUnavailableError, match="apt-get install -y dataset-fashion-mnist"):
        list(iter_fashion_mnist(tmp_path, split="train"))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 2]), 2049)
    with pytest.raises(ValueError, match="3 images but .* 2 labels"):
        list(iter_fashion_mnist(tmp_path, split="test"))


def test_clipart_reader_captions_from_paths(tmp_path):
    for name in ("animals/mammals/seal_01.png", "signs_and_symbols/no-parking_02.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(png_bytes(mode="P", colour=3))
    records = list(iter_clipart(tmp_path))
    assert [(r.caption, r.label) for r in records] == [
        ("clip art of seal, animals, mammals", 0),
        ("clip art of no parking, signs and symbols", 1),
    ]
    assert caption_from_path(Path("shapes/01.png")) == "01, shapes"
    with pytest.raises(SourceUnavailableError, match="apt-get install -y openclipart-png"):
        list(iter_clipart(tmp_path / "absent"))


# --- the real packages, when installed (scripts/get_offline_data.sh) --------------------------------------


def test_real_fashion_mnist_package():
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist not installed (scripts/get_offline_data.sh fashion_mnist)")
    first = next(iter_fashion_mnist(split="test"))
    assert first.image.size == (28, 28) and 0 <= first.label < 10


def test_real_emoji_package():
    try:
        records = iter_emoji()
        first = next(records)
    except SourceUnavailableError:
        pytest.skip("emoji-datasource-google not unpacked (scripts/get_offline_data.sh emoji)")
    assert first.open_image().size == (64, 64) and first.caption.startswith("an emoji of ")
    assert sum(1 for _ in records) + 1 == 3786


def test_real_clipart_package():
    if not CLIPART_DIR.is_dir():
        pytest.skip("openclipart-png not installed (scripts/get_offline_data.sh clipart)")
    first = next(iter_clipart())
    assert first.caption.startswith("clip art of ") and first.label >= 0
