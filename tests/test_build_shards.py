"""The converter on messy input: mixed formats and modes, broken files, CSV and
train/validation layouts, resume, strict mode, and MPI ranks."""

import hashlib
import io
import os
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data_pipeline import shard_writer
from data_pipeline.build_shards import build, main
from data_pipeline.images import ImageOptions
from data_pipeline.metadata import DataError, load_metadata, shard_files
from data_pipeline.records import parse_example
from helpers import run

GOOD = {"ant": 5, "bee": 4, "cow": 3}
BROKEN = {"bee/broken.jpg", "bee/trunc.png", "cow/liar.jpg"}


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_messy_folder(root) -> None:
    """3 usable classes of mixed formats, sizes and modes, 3 broken files, an empty
    class, a nested folder, a non-image and a hidden file."""
    files = {
        "ant/a.jpg": _encode(_noise(20, 14, 1), "JPEG"),
        "ant/b.png": _encode(Image.new("L", (9, 9), 77), "PNG"),
        "ant/sub/deeper/c.gif": _encode(_noise(6, 5, 2).convert("P"), "GIF"),
        "ant/d.bmp": _encode(_noise(7, 3, 3), "BMP"),
        "ant/e.png": _encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"),  # fully transparent
        "bee/cmyk.jpg": _encode(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), "JPEG"),  # red in CMYK
        "bee/deep.png": _encode(Image.fromarray(np.full((5, 5), 0x8000, np.uint16)), "PNG"),  # 16-bit gray
        "bee/f.jpg": _encode(_noise(12, 12, 4), "JPEG"),
        "bee/g.png": _encode(_noise(10, 4, 5), "PNG"),
        "bee/broken.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4,
        "bee/trunc.png": _encode(_noise(30, 30, 6), "PNG")[:400],
        "cow/h.jpg": _encode(_noise(16, 9, 7), "JPEG"),
        "cow/i.jpg": _encode(_noise(9, 16, 8), "JPEG"),
        "cow/k.bmp": _encode(Image.new("L", (5, 5), 200), "BMP"),
        "cow/liar.jpg": _encode(_noise(5, 5, 9), "PNG"),  # PNG bytes behind a .jpg name
        "cow/notes.txt": b"not an image",
        "cow/.hidden.jpg": _encode(_noise(5, 5, 10), "JPEG"),
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "empty").mkdir()


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy") / "images"
    make_messy_folder(root)
    return root


def records(out, meta, split="train") -> dict[str, dict]:
    """Every record of a split by example id, decoded."""
    found = {}
    for serialized in tf.data.TFRecordDataset(shard_files(str(out), meta, split)):
        ex = {k: v.numpy() for k, v in parse_example(serialized).items()}
        ex["pixels"] = tf.io.decode_image(ex["image/encoded"], expand_animations=False).numpy()
        found[ex["image/id"].decode()] = ex
    return found


def digests(out, meta) -> list[str]:
    return [hashlib.sha256((out / s["file"]).read_bytes()).hexdigest()
            for split in ("train", "validation") for s in meta["splits"].get(split, {}).get("shards", [])]


def test_mixed_folder_counts_skip_report_and_rgb_records(messy, tmp_path):
    out = tmp_path / "out"
    meta = build(str(messy), str(out), num_shards=2, val_fraction=0.0)
    assert meta["class_names"] == ["ant", "bee", "cow"]  # the empty class is left out
    assert meta["empty_classes"] == ["empty"]
    assert meta["splits"]["train"]["per_class"] == GOOD
    assert meta["splits"]["train"]["num_skipped"] == 3
    assert {os.path.relpath(s["path"], messy) for s in meta["skipped"]} == BROKEN
    reasons = {os.path.relpath(s["path"], messy): s["reason"] for s in meta["skipped"]}
    assert reasons["cow/liar.jpg"] == "content is PNG, not the JPEG its extension says"
    assert meta["ignored"] == {"hidden": 1, "not_image": 1}
    assert load_metadata(str(out))["skipped"] == meta["skipped"]

    recs = records(out, meta)
    assert sorted(recs) == sorted(
        ["ant/a.jpg", "ant/b.png", "ant/sub/deeper/c.gif", "ant/d.bmp", "ant/e.png", "bee/cmyk.jpg",
         "bee/deep.png", "bee/f.jpg", "bee/g.png", "cow/h.jpg", "cow/i.jpg", "cow/k.bmp"])
    for rid, ex in recs.items():
        h, w = ex["image/height"], ex["image/width"]
        assert ex["pixels"].shape == (h, w, 3) == (ex["image/original_height"], ex["image/original_width"], 3), rid
        assert ex["image/channels"] == 3
        assert ex["image/class/name"].decode() == rid.split("/")[0]
        assert meta["class_names"][ex["image/class/label"]] == rid.split("/")[0]
    # A plain RGB JPEG is stored byte for byte; other sources are re-encoded.
    assert recs["ant/a.jpg"]["image/encoded"] == (messy / "ant" / "a.jpg").read_bytes()
    assert recs["ant/b.png"]["image/format"] == b"png" and recs["bee/cmyk.jpg"]["image/format"] == b"jpeg"
    assert (recs["ant/b.png"]["pixels"] == 77).all()
    assert (recs["bee/deep.png"]["pixels"] == 128).all()  # 0x8000 of 16 bits
    assert (recs["ant/e.png"]["pixels"] == 255).all()  # transparent on white
    red = recs["bee/cmyk.jpg"]["pixels"].reshape(-1, 3).mean(0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60, red
    assert (recs["ant/sub/deeper/c.gif"]["pixels"].shape, recs["ant/d.bmp"]["pixels"].shape) == ((5, 6, 3), (3, 7, 3))


def test_options_gray_resize_png_and_empty_class_kept(messy, tmp_path):
    opts = ImageOptions(channels=1, encoding="png", max_side=8)
    meta = build(str(messy), str(tmp_path / "out"), num_shards=1, val_fraction=0.0, image_options=opts,
                 keep_empty_classes=True)
    assert meta["class_names"] == ["ant", "bee", "cow", "empty"]
    assert meta["splits"]["train"]["per_class"] == {**GOOD, "empty": 0}
    assert meta["channels"] == 1 and meta["options"]["max_side"] == 8
    recs = records(tmp_path / "out", meta)
    a = recs["ant/a.jpg"]
    assert a["image/format"] == b"png" and a["pixels"].shape == (6, 8, 1)  # 20x14 -> longer side 8
    assert (a["image/original_height"], a["image/original_width"]) == (14, 20)
    assert all(max(r["pixels"].shape[:2]) <= 8 for r in recs.values())


def test_same_input_gives_byte_identical_shards(messy, tmp_path):
    a = build(str(messy), str(tmp_path / "a"), num_shards=3, val_fraction=0.3, seed=7)
    b = build(str(messy), str(tmp_path / "b"), num_shards=3, val_fraction=0.3, seed=7)
    assert digests(tmp_path / "a", a) == digests(tmp_path / "b", b)
    assert [s["sha256"] for s in a["splits"]["train"]["shards"]] == digests(tmp_path / "a", a)[:3]
    # Stratified: round(n * 0.3) of the listed files of each class, before broken ones are skipped.
    val = a["splits"]["validation"]
    assert val["num_examples"] + val["num_skipped"] == 2 + 2 + 1


def test_interrupted_conversion_resumes_without_rewriting_complete_shards(messy, tmp_path, monkeypatch):
    ref = build(str(messy), str(tmp_path / "ref"), num_shards=4, val_fraction=0.0)
    out = tmp_path / "out"
    real_write, calls = shard_writer.write_shard, []

    def interrupted_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[0].name)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(shard_writer, "write_shard", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        build(str(messy), str(out), num_shards=4, val_fraction=0.0)
    monkeypatch.undo()
    work = tmp_path / "out.partial"
    assert not out.exists() and sorted(p.name for p in work.glob("*.tfrecord")) == sorted(calls)
    kept, tampered = (work / calls[0]), (work / calls[1])
    before = (kept.stat().st_ino, kept.stat().st_mtime_ns)
    tampered.write_bytes(tampered.read_bytes() + b"x")  # fails its checksum: must be rewritten

    with pytest.raises(DataError, match="interrupted conversion of other files or options"):
        build(str(messy), str(out), num_shards=3, val_fraction=0.0)
    meta = build(str(messy), str(out), num_shards=4, val_fraction=0.0)
    assert (os.stat(out / calls[0]).st_ino, os.stat(out / calls[0]).st_mtime_ns) == before
    assert digests(out, meta) == digests(tmp_path / "ref", ref)
    assert meta["skipped"] == ref["skipped"]
    assert sorted(p.name for p in out.iterdir()) == sorted([s["file"] for s in meta["splits"]["train"]["shards"]]
                                                           + ["metadata.json"])


def test_strict_cli_stops_at_the_first_broken_file(messy, tmp_path):
    res = run([sys.executable, "-m", "data_pipeline.build_shards", "--images", messy, "--out", tmp_path / "out",
               "--num-shards", "3", "--strict", "--workers", "2"])
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("build_shards: error: cannot use image ")
    assert any(str(messy / b) in line for b in BROKEN), line
    assert not (tmp_path / "out").exists()


def test_csv_listing(messy, tmp_path):
    listing = tmp_path / "list.csv"
    rel = os.path.relpath(messy, tmp_path)
    rows = ["path,label", f"{rel}/ant/a.jpg,2", f"{rel}/ant/b.png,2", f"{rel}/bee/f.jpg,10",
            f"{rel}/cow/h.jpg,10", f"{rel}/cow/gone.jpg,10", f"{rel}/cow/notes.txt,10", f"{rel}/bee/trunc.png,2"]
    listing.write_text("\n".join(rows) + "\n")
    meta = build(None, str(tmp_path / "out"), num_shards=1, val_fraction=0.0, csv_path=str(listing))
    assert meta["class_names"] == ["2", "10"]  # integer labels in numeric order
    # '\u00b2' passes str.isdigit() but not int(): labels that are not all ASCII numbers sort as text.
    superscript = tmp_path / "superscript.csv"
    superscript.write_text(f"{rel}/ant/a.jpg,2\n{rel}/bee/f.jpg,\u00b2\n{rel}/cow/h.jpg,10\n", encoding="utf-8")
    assert build(None, str(tmp_path / "sup"), num_shards=1, val_fraction=0.0,
                 csv_path=str(superscript))["class_names"] == ["10", "2", "\u00b2"]
    assert meta["splits"]["train"]["per_class"] == {"2": 2, "10": 2}
    assert {os.path.basename(s["path"]) for s in meta["skipped"]} == {"gone.jpg", "trunc.png"}
    assert meta["ignored"]["not_image"] == 1
    ids = sorted(records(tmp_path / "out", meta))
    assert ids[0] == os.path.normpath(f"{rel}/ant/a.jpg")

    listing.write_text("path,label\nonly-a-path.jpg\n")
    with pytest.raises(DataError, match="line 2: expected 'path,label'"):
        build(None, str(tmp_path / "bad"), num_shards=1, csv_path=str(listing))
    listing.write_bytes("path,label\ncaf\u00e9.jpg,1\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        build(None, str(tmp_path / "bad"), num_shards=1, csv_path=str(listing))
    assert str(e.value) == f"CSV file {str(listing)!r}: not UTF-8 (byte 0xe9); save it as UTF-8"


def test_non_numeric_mpi_size_is_one_line(messy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PMI_SIZE", "four")
    assert main(["--images", str(messy), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == "build_shards: error: PMI_SIZE='four' is not a number of ranks\n"


def test_existing_train_validation_layout(tmp_path):
    root = tmp_path / "images"
    for split, n in (("train", 4), ("validation", 2)):
        for c, cls in enumerate(("x", "y")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                (root / split / cls / f"{i}.png").write_bytes(_encode(_noise(4, 4, 10 * c + i), "PNG"))
    meta = build(str(root), str(tmp_path / "out"), num_shards=2, val_fraction=0.5)
    assert meta["class_names"] == ["x", "y"]
    assert meta["splits"]["train"]["per_class"] == {"x": 4, "y": 4}
    assert meta["splits"]["validation"]["per_class"] == {"x": 2, "y": 2}
    assert all(i.startswith("validation/") for i in records(tmp_path / "out", meta, "validation"))

    # A target shard size instead of a count, estimated from the source files.
    train_bytes = sum(p.stat().st_size for p in (root / "train").rglob("*.png"))
    meta = build(str(root), str(tmp_path / "sized"), shard_size_mb=train_bytes / 3.5 / 2**20)
    assert len(meta["splits"]["train"]["shards"]) == 4
    assert len(meta["splits"]["validation"]["shards"]) == 2


@pytest.mark.mpi
def test_mpirun_two_ranks_match_one_process(messy, tmp_path):
    """Two ranks with two worker processes each write the same bytes as one process."""
    single = build(str(messy), str(tmp_path / "one"), num_shards=3, val_fraction=0.25, seed=2)
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    res = run(["mpirun", "-np", "2", "--oversubscribe", sys.executable, "-m", "data_pipeline.build_shards",
               "--images", messy, "--out", tmp_path / "two", "--num-shards", "3", "--val-fraction", "0.25",
               "--seed", "2", "--workers", "2"], env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = load_metadata(str(tmp_path / "two"))
    assert digests(tmp_path / "two", meta) == digests(tmp_path / "one", single)
    assert meta["splits"] == single["splits"] and meta["skipped"] == single["skipped"]
    total = len(digests(tmp_path / "two", meta))
    assert total == 4
    assert "rank 0 of 2: 2 of 4 shards" in res.stderr and "rank 1 of 2: 2 of 4 shards" in res.stderr
    assert res.stderr.count("wrote ") == 1  # one report, from rank 0


@pytest.mark.mpi
def test_mpirun_a_csv_that_is_not_utf8_ends_every_rank_with_one_line(tmp_path):
    """Rank 0 reads the CSV: its error rides on the broadcast that rank 1 waits in."""
    listing = tmp_path / "list.csv"
    listing.write_bytes("path,label\ncaf\u00e9.jpg,1\n".encode("latin-1"))
    env = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    res = run(["mpirun", "-np", "2", "--oversubscribe", sys.executable, "-m", "data_pipeline.build_shards",
               "--csv", listing, "--out", tmp_path / "out", "--workers", "1"], env=env, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert errors == [f"build_shards: error: CSV file {str(listing)!r}: not UTF-8 (byte 0xe9); save it as UTF-8"]
    assert not (tmp_path / "out").exists()


def test_record_writer_matches_tensorflow(tmp_path):
    from data_pipeline.record_writer import TFRecordFile, encode_example

    records_in = [encode_example(b"\x00\xffbytes", "png", (3, 300, 1), label, "naïve", f"id/{label}", (600, 7))
                  for label in (0, 1, 200, 2**40, -5)]
    for rec, label in zip(records_in, (0, 1, 200, 2**40, -5)):
        f = {k: tf.train.Feature(int64_list=tf.train.Int64List(value=[v])) if isinstance(v, int)
             else tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
             for k, v in {"image/encoded": b"\x00\xffbytes", "image/format": b"png", "image/height": 3,
                          "image/width": 300, "image/channels": 1, "image/class/label": label,
                          "image/class/name": "naïve".encode(), "image/id": f"id/{label}".encode(),
                          "image/original_height": 600, "image/original_width": 7}.items()}
        expected = tf.train.Example(features=tf.train.Features(feature=f)).SerializeToString(deterministic=True)
        assert rec == expected
    with TFRecordFile(str(tmp_path / "r.tfrecord")) as w:
        for rec in records_in:
            w.write(rec)
    # TensorFlow's reader checks both CRCs of every record.
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(tmp_path / "r.tfrecord"))] == records_in


def _small_folder(root) -> dict[str, bytes]:
    for c, cls in enumerate(("x", "y")):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            (root / cls / f"{i}.png").write_bytes(_encode(_noise(4, 4, 10 * c + i), "PNG"))
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("case, relation", [
    ("same", "is"), ("inside", "is inside"), ("above", "holds"), ("symlink", "is"), ("work-folder", "is"),
    ("csv-folder", "is"), ("csv-listed", "holds"),
])
def test_output_that_would_delete_the_input_is_refused(case, relation, overwrite, tmp_path):
    images = tmp_path / "top" / "images"
    if case == "work-folder":  # <out>.partial is the input
        images = tmp_path / "top" / "data.partial"
    before = _small_folder(images)
    source = ["--images", images]
    out = {"same": images, "inside": images / "out", "above": tmp_path / "top", "symlink": tmp_path / "link",
           "work-folder": tmp_path / "top" / "data", "csv-folder": images, "csv-listed": images}[case]
    what = "its work folder" if case == "work-folder" else "--out"
    if case == "symlink":
        out.symlink_to(images, target_is_directory=True)
    if case == "csv-folder":
        listing = images / "list.csv"
        listing.write_text("path,label\nx/0.png,x\ny/0.png,y\n")
        before[str(listing)] = listing.read_bytes()
        source = ["--csv", listing]
    if case == "csv-listed":  # the CSV lies elsewhere; the files it lists are in --out
        listing = tmp_path / "lists" / "list.csv"
        listing.parent.mkdir()
        listing.write_text("path,label\n../top/images/x/0.png,x\n../top/images/y/0.png,y\n")
        source = ["--csv", listing]
    res = run([sys.executable, "-m", "data_pipeline.build_shards", *source, "--out", out, "--num-shards", "1",
               "--workers", "1", *(["--overwrite"] if overwrite else [])])
    assert res.returncode == 2, res.stderr
    shown = f"{out}.partial" if case == "work-folder" else str(out)
    given = {"csv-folder": f"the folder of --csv {str(listing)!r}" if case == "csv-folder" else "",
             "csv-listed": f"{str(images / 'x')!r}, listed in --csv {str(listing)!r}" if case == "csv-listed" else ""
             }.get(case, f"--images {str(images)!r}")
    message = (f"{what} {shown!r} {relation} {given}: writing there would delete the input; choose an output "
               "folder outside it")
    if case == "csv-listed" and not overwrite:  # the CSV is read after this older refusal
        message = f"output folder {str(out)!r} already exists (pass --overwrite to replace it)"
    assert res.stderr.strip() == f"build_shards: error: {message}"
    assert {str(p): p.read_bytes() for p in images.rglob("*") if p.is_file()} == before
    assert case == "work-folder" or not os.path.exists(f"{out}.partial")


def test_symlink_loops_are_not_followed_and_other_links_are(tmp_path):
    images = tmp_path / "images"
    _small_folder(images)
    (images / "x" / "again").symlink_to(images / "x", target_is_directory=True)  # a loop in a class
    (images / "y" / "top").symlink_to(images, target_is_directory=True)  # a loop through the root
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "2.png").write_bytes(_encode(_noise(4, 4, 99), "PNG"))
    (images / "y" / "more").symlink_to(elsewhere, target_is_directory=True)  # no loop: followed
    res = run([sys.executable, "-m", "data_pipeline.build_shards", "--images", images, "--out", tmp_path / "out",
               "--num-shards", "1", "--val-fraction", "0", "--workers", "1"], timeout=120)
    assert res.returncode == 0, res.stderr
    meta = load_metadata(str(tmp_path / "out"))
    assert meta["splits"]["train"]["per_class"] == {"x": 2, "y": 3}
    assert sorted(records(tmp_path / "out", meta)) == ["x/0.png", "x/1.png", "y/0.png", "y/1.png", "y/more/2.png"]
    assert f"skipped {images / 'x' / 'again'}: it links back to {images / 'x'}, which holds it" in res.stderr


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG (checksums right) that claims a huge size and holds a few zero bytes: a bomb's outline."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")


@pytest.mark.parametrize("max_pixels, skipped", [
    (None, {"x/bomb.png": "Image size (10000000000 pixels) is over --max-pixels 178956970"}),
    # 4x4 images pass 16, 5x5 do not: a real image over a low cap is skipped before decoding.
    (16, {"x/bomb.png": "Image size (10000000000 pixels) is over --max-pixels 16",
          "y/big.png": "5x5 pixels is over --max-pixels 16"}),
])
def test_images_over_max_pixels_are_skipped_files(max_pixels, skipped, tmp_path):
    images = tmp_path / "images"
    _small_folder(images)
    (images / "x" / "bomb.png").write_bytes(_png_claiming(100_000, 100_000))
    (images / "y" / "big.png").write_bytes(_encode(_noise(5, 5, 7), "PNG"))
    limit = [] if max_pixels is None else ["--max-pixels", str(max_pixels)]
    res = run([sys.executable, "-m", "data_pipeline.build_shards", "--images", images, "--out", tmp_path / "out",
               "--num-shards", "1", "--val-fraction", "0", "--workers", "1", *limit])
    assert res.returncode == 0, res.stderr
    meta = load_metadata(str(tmp_path / "out"))
    assert {os.path.relpath(s["path"], images): s["reason"] for s in meta["skipped"]} == skipped
    assert meta["splits"]["train"]["num_examples"] == 6 - len(skipped)
    assert meta["options"]["max_pixels"] == (max_pixels or 178956970)
