"""Data loaders and validation (SPEC §5), offline on tiny generated files."""

import csv
import json
import subprocess
import sys

import datasets
import pytest
from PIL import Image

from conftest import make_pairs
from hf_uwm.data import (SkippedRowsWarning, ValidationReport, check_pairs, columns_for, load_folder, load_pairs,
                         load_visu, validate_pairs)

PAIR_COLUMNS = ["safe_text", "unsafe_text", "safe_image", "unsafe_image"]


def write_image(path, shade=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (shade, 64, 128)).save(path)
    return path


def visu_records(n=6):
    return [{"incremental_id": 10 + i, "tag": f"concept{i % 2}", "safe": f"a cat number {i}",
             "nsfw": f"a bloody cat number {i}", "coco_id": 100 + i} for i in range(n)]


@pytest.fixture
def visu(tmp_path):
    """ViSU JSON plus image folders, safe images named in every accepted COCO style."""
    names = ["000000000100.jpg", "101.png", "COCO_train2014_000000000102.jpg", "103.jpg", "104.png", "105.png"]
    for i, name in enumerate(names):
        write_image(tmp_path / "coco" / name, shade=i)
        write_image(tmp_path / "unsafe" / f"{10 + i}.png", shade=200 + i)
    (tmp_path / "visu.json").write_text(json.dumps(visu_records()))
    return tmp_path


def visu_load(root, records=None, **kwargs):
    if records is not None:
        (root / "visu.json").write_text(json.dumps(records))
    return load_visu(root / "visu.json", root / "coco", root / "unsafe", **kwargs)


@pytest.fixture
def folder(tmp_path):
    for i in range(4):
        write_image(tmp_path / "safe" / f"p{i}.png", shade=i)
        write_image(tmp_path / "unsafe" / f"p{i}.png", shade=100 + i)
    write_captions(tmp_path, [{"file_name": f"p{i}.png", "safe_text": f"a dog {i}", "unsafe_text": f"a dead dog {i}"}
                              for i in range(4)])
    return tmp_path


def write_captions(root, rows):
    with open(root / "captions.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# --- loaders -------------------------------------------------------------------------------------

def test_import_does_not_need_datasets():
    code = "import sys, hf_uwm.data; assert 'datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_visu_joins_texts_with_coco_and_unsafe_images(visu):
    with pytest.warns(UserWarning, match="Asked for 8192 pairs .* only 6"):
        data = visu_load(visu)
    assert set(PAIR_COLUMNS + ["concept", "id"]) <= set(data.column_names)
    assert data["id"] == list(range(10, 16)) and data[1]["unsafe_text"] == "a bloody cat number 1"
    assert data[0]["concept"] == "concept0"
    assert data[2]["safe_image"].getpixel((0, 0))[0] == pytest.approx(2, abs=3)  # COCO_train2014_…102.jpg
    assert data[4]["unsafe_image"].getpixel((0, 0)) == (204, 64, 128)


def test_visu_sampling_is_seeded_and_reproducible(visu):
    first, again = visu_load(visu, samples=3, seed=0), visu_load(visu, samples=3, seed=0)
    assert first["id"] == again["id"] and len(first) == 3 and first["id"] == sorted(first["id"])
    assert {tuple(visu_load(visu, samples=3, seed=s)["id"]) for s in range(6)} != {tuple(first["id"])}


def test_visu_text_only_and_jsonl_and_several_files(visu):
    lines = "\n".join(json.dumps(r) for r in visu_records(8)[6:])
    (visu / "more.jsonl").write_text(lines)
    data = load_visu([visu / "visu.json", visu / "more.jsonl"], samples=None)
    assert len(data) == 8 and "safe_image" not in data.column_names


def test_folder_with_captions(folder):
    data = load_folder(folder)
    assert data["id"] == [f"p{i}.png" for i in range(4)] and data[3]["unsafe_text"] == "a dead dog 3"
    assert data[1]["unsafe_image"].getpixel((0, 0)) == (101, 64, 128)
    assert len(load_folder(folder, samples=2, seed=1)) == 2


def test_folder_without_captions_is_image_only_and_jsonl_captions_work(folder):
    (folder / "captions.csv").unlink()
    assert load_folder(folder).column_names == ["id", "safe_image", "unsafe_image"]
    (folder / "captions.jsonl").write_text(json.dumps(
        {"file_name": "p0.png", "safe_text": "a dog", "unsafe_text": "a dead dog", "concept": "death"}))
    assert load_folder(folder)[0]["concept"] == "death"


def test_folder_layout_errors(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="neither captions.csv"):
        load_folder(tmp_path / "nothing")
    (folder / "captions.jsonl").write_text("{}")
    with pytest.raises(ValueError, match="both captions.csv and captions.jsonl"):
        load_folder(folder)
    (folder / "captions.jsonl").unlink()
    write_captions(folder, [{"file_name": "p0.png", "caption": "a dog"}])
    with pytest.raises(ValueError, match=r"no \['safe_text', 'unsafe_text'\] column"):
        load_folder(folder)


def test_load_pairs_from_save_to_disk_with_split_and_sampling(tmp_path):
    datasets.DatasetDict({"train": make_pairs(6), "test": make_pairs(2, seed=1)}).save_to_disk(tmp_path / "d")
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]: pass split="):
        load_pairs(tmp_path / "d")
    with pytest.raises(ValueError, match="no split 'val'"):
        load_pairs(tmp_path / "d", split="val")
    data = load_pairs(tmp_path / "d", split="train", samples=4, seed=3)
    assert len(data) == 4 and data["safe_text"] == load_pairs(tmp_path / "d", split="train", samples=4, seed=3)[
        "safe_text"]
    assert isinstance(data[0]["safe_image"], Image.Image)


def test_load_pairs_maps_columns_of_a_csv_with_relative_image_paths(tmp_path):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / "img" / name)
    write_image(tmp_path / "img" / "a_bad.png", shade=255)
    with open(tmp_path / "pairs.csv", "w", newline="") as file:
        csv.writer(file).writerows([["caption", "nsfw", "img", "img_nsfw", "safe_text"],
                                    ["a cat", "a dead cat", "img/a.png", "img/a_bad.png", "ignored"],
                                    ["a dog", "a dead dog", "img/b.png", "img/a_bad.png", "ignored"]])
    mapping = {"safe_text": "caption", "unsafe_text": "nsfw", "safe_image": "img", "unsafe_image": "img_nsfw"}
    data = load_pairs(tmp_path / "pairs.csv", columns=mapping)
    assert sorted(data.column_names) == sorted(PAIR_COLUMNS) and data["safe_text"] == ["a cat", "a dog"]
    assert data[1]["unsafe_image"].getpixel((0, 0)) == (255, 64, 128)
    with pytest.raises(ValueError, match=r"source column\(s\) \['nope'\]"):
        load_pairs(tmp_path / "pairs.csv", columns={"safe_text": "nope"})
    with pytest.raises(ValueError, match=r"unknown name\(s\) \['caption'\]"):
        load_pairs(tmp_path / "pairs.csv", columns={"caption": "safe_text"})
    with pytest.raises(ValueError, match="has 'safe_text' but not 'unsafe_text'"):
        load_pairs(tmp_path / "pairs.csv")


def write_pair_file(path, rows):
    """rows (dicts of the four columns, images as relative paths) as a .csv, .json, .jsonl or .parquet file."""
    if path.suffix == ".csv":
        with open(path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(path)
    return path


def pair_rows(root, n=3):
    rows = []
    for i in range(n):
        write_image(root / "img" / f"s{i}.png", shade=i)
        write_image(root / "img" / f"u{i}.png", shade=100 + i)
        rows.append({"safe_text": f"a cat {i}", "unsafe_text": f"a dead cat {i}", "safe_image": f"img/s{i}.png",
                     "unsafe_image": f"img/u{i}.png"})
    return rows


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_a_single_data_file_is_its_own_split(tmp_path, suffix):
    path = write_pair_file(tmp_path / f"pairs{suffix}", pair_rows(tmp_path))
    for split in ("train", "test", "validation", None):
        data = load_pairs(path, split=split)
        assert data["safe_text"] == ["a cat 0", "a cat 1", "a cat 2"], split
        assert data[2]["unsafe_image"].getpixel((0, 0)) == (102, 64, 128)


def test_a_missing_split_names_the_split_to_choose(tmp_path):
    from hf_uwm.hints import command_line_hints

    (tmp_path / "folder").mkdir()
    write_pair_file(tmp_path / "folder" / "pairs.csv", pair_rows(tmp_path / "folder"))
    datasets.DatasetDict({"train": make_pairs(2)}).save_to_disk(tmp_path / "saved")
    for source in (tmp_path / "folder", tmp_path / "saved"):
        with pytest.raises(ValueError, match=r"has no split 'test'; its splits are \['train'\]: pass split='train'"):
            load_pairs(source, split="test")
        with command_line_hints(), pytest.raises(ValueError, match="choose one with --split train"):
            load_pairs(source, split="test")
        with command_line_hints(split_flag="--eval-split"), pytest.raises(ValueError, match="--eval-split train"):
            load_pairs(source, split="test")


def test_warnings_name_the_callers_line(tmp_path):
    # Not a line inside hf_uwm ("data.py:271: ... return _finish(...)"): the user's own call.
    rows = pair_rows(tmp_path)
    path = write_pair_file(tmp_path / "pairs.csv", rows)
    bad = write_pair_file(tmp_path / "bad.csv", rows[:2] + [{**rows[2], "safe_text": ""}])
    with pytest.warns(UserWarning, match="Asked for 300 pairs but .* has only 3") as asked:
        load_pairs(path, samples=300)
    with pytest.warns(SkippedRowsWarning) as skipped:
        load_pairs(bad, skip_bad_rows=True)
    with pytest.warns(SkippedRowsWarning) as direct:
        validate_pairs({"safe_text": ["a", ""], "unsafe_text": ["b", "c"]}, columns_for(["text"]), skip_bad_rows=True)
    for caught in (asked, skipped, direct):
        assert [w.filename for w in caught] == [__file__]


def test_load_pairs_from_a_dataset_and_a_parquet_folder(tmp_path):
    pairs = make_pairs(3, images=False)
    assert load_pairs(pairs)["unsafe_text"] == pairs["unsafe_text"]
    (tmp_path / "parquet").mkdir()
    pairs.to_parquet(tmp_path / "parquet" / "train.parquet")
    assert load_pairs(tmp_path / "parquet")["safe_text"] == pairs["safe_text"]


# --- validation ----------------------------------------------------------------------------------

def test_columns_for():
    assert columns_for(["text"]) == ("safe_text", "unsafe_text")
    assert columns_for(["text", "vision"]) == tuple(PAIR_COLUMNS)


def test_data_fingerprint_tells_pairs_apart_and_is_stable(tmp_path):
    import torch

    from hf_uwm.data import PreprocessedPairs, data_fingerprint

    images = ("safe_image", "unsafe_image")

    def key(dataset):
        return data_fingerprint(validate_pairs(dataset, images))

    assert key(make_pairs(4, texts=False)) == key(make_pairs(4, texts=False))  # the same pairs, built again
    assert key(make_pairs(4, texts=False)) != key(make_pairs(4, seed=9, texts=False))  # other images alone
    pairs = validate_pairs(make_pairs(4), images)
    assert data_fingerprint(pairs.select([0, 1])) != data_fingerprint(pairs.select([1, 2]))
    make_pairs(4).save_to_disk(tmp_path / "pairs")
    on_disk = [validate_pairs(datasets.load_from_disk(tmp_path / "pairs"), images).select([3, 1]) for _ in range(2)]
    assert data_fingerprint(on_disk[0]) == data_fingerprint(on_disk[1])  # by its files, loaded twice
    preprocessed = PreprocessedPairs({"text": {"input_ids": torch.ones(2, 3)}}, {"text": {"input_ids": torch.zeros(2, 3)}})
    assert data_fingerprint(preprocessed) == preprocessed.fingerprint


def test_validate_pairs_accepts_dicts_and_refuses_bad_sets():
    assert len(validate_pairs({"safe_text": ["a"], "unsafe_text": ["b"]}, columns_for(["text"]))) == 1
    with pytest.raises(ValueError, match="different lengths"):
        validate_pairs({"safe_text": ["a", "b"], "unsafe_text": ["b"]}, columns_for(["text"]))
    with pytest.raises(TypeError, match="Expected a datasets.Dataset"):
        validate_pairs([("a", "b")], columns_for(["text"]))
    with pytest.raises(ValueError, match="holds .* not images"):
        validate_pairs({"safe_image": [1], "unsafe_image": [2]}, columns_for(["vision"]))


def test_empty_text_names_column_row_and_id(visu):
    records = visu_records()
    records[3]["nsfw"] = "  "
    with pytest.raises(ValueError, match=r"Column 'unsafe_text', row 3 \(id 13\): the text is empty \('  '\)"):
        visu_load(visu, records, samples=None)


@pytest.mark.parametrize("text,problem", [(None, "the text is empty."), ("", "the text is empty."),
                                          (" ", "the text is empty (' ')"),
                                          (3, "expected a text (a non-empty string), got int 3")])
def test_an_empty_text_is_called_empty(text, problem):
    # An empty CSV cell reads as None: the user reads "empty", not "got None".
    data = {"safe_text": [text], "unsafe_text": ["a dead dog"]}
    with pytest.raises(ValueError) as error:
        validate_pairs(data, columns_for(["text"]))
    assert f"Column 'safe_text', row 0: {problem}" in str(error.value)


def test_missing_image_is_a_file_not_found_naming_the_file(visu):
    (visu / "coco" / "103.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"'safe_image', row 3 \(id 13\): image file .*000000000103\.\* "
                                                r"does not exist"):
        visu_load(visu, samples=None)


def test_undecodable_image_is_refused(folder):
    (folder / "unsafe" / "p2.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"'unsafe_image', row 2 \(id 'p2.png'\): cannot decode image .*p2.png"):
        load_folder(folder)
    truncated = (folder / "safe" / "p1.png").read_bytes()[:-20]
    (folder / "safe" / "p1.png").write_bytes(truncated)
    with pytest.raises(ValueError, match=r"'safe_image', row 1 .*cannot decode.*\(1 more bad row"):
        load_folder(folder)


def test_mismatched_pair_counts_name_the_missing_file(folder):
    write_image(folder / "safe" / "extra.png")
    (folder / "captions.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"'unsafe_image', row 0 \(id 'extra.png'\): .*unsafe/extra.png"):
        load_folder(folder)
    (folder / "unsafe").rename(folder / "elsewhere")
    with pytest.raises(FileNotFoundError, match="has safe/ but not the other image folder"):
        load_folder(folder)


def test_duplicate_ids_are_refused(visu):
    records = visu_records()
    records[4]["incremental_id"] = 11
    with pytest.raises(ValueError, match=r"Column 'id', row 4 \(id 11\): duplicate id, already used by row 1"):
        visu_load(visu, records, samples=None)


def test_skip_bad_rows_reports_and_skips(visu):
    records = visu_records()
    records[0]["safe"] = ""
    records[4]["incremental_id"] = 11
    (visu / "unsafe" / "12.png").write_bytes(b"garbage")
    with pytest.warns(SkippedRowsWarning, match="3 of 6 rows are bad") as caught:
        data = visu_load(visu, records, samples=None, skip_bad_rows=True)
    assert data["id"] == [11, 13, 15]
    report = next(w.message.report for w in caught if isinstance(w.message, SkippedRowsWarning))
    assert isinstance(report, ValidationReport) and report.bad_rows == [0, 2, 4]
    assert {(b.row, b.column) for b in report.bad} == {(0, "safe_text"), (2, "unsafe_image"), (4, "id")}


def test_check_pairs_returns_the_report_without_raising():
    bad = make_pairs(3).map(lambda r, i: {"safe_text": "" if i == 1 else r["safe_text"]}, with_indices=True)
    report = check_pairs(bad, columns_for(["text", "vision"]))
    assert report.bad_rows == [1] and report.good_rows == [0, 2] and "Column 'safe_text', row 1" in str(report)


def test_all_rows_bad_is_an_error(folder):
    write_captions(folder, [{"file_name": "p0.png", "safe_text": "", "unsafe_text": "x"}])
    with pytest.raises(ValueError, match="Every row is bad"):
        load_folder(folder, skip_bad_rows=True)


def test_samples_must_be_positive(visu):
    with pytest.raises(ValueError, match="samples must be a positive"):
        visu_load(visu, samples=0)


# --- messy data of one's own ---------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_file_not_in_utf8_names_itself_its_line_and_the_fix(tmp_path, suffix):
    rows = pair_rows(tmp_path)
    rows[1]["safe_text"] = "a café 1"
    path = write_pair_file(tmp_path / f"pairs{suffix}", rows)
    text = path.read_text().replace("\\u00e9", "\u00e9")  # JSON escapes it
    path.write_bytes(text.encode("cp1252"))  # what a spreadsheet on Windows saves
    line = 3 if suffix == ".csv" else 2  # after the CSV's header
    with pytest.raises(ValueError, match=rf"pairs{suffix} is not UTF-8 text: line {line} holds the byte 0xe9.*"
                                         rf"Save it as UTF-8, e.g. `iconv -f cp1252 -t utf-8 pairs{suffix}"):
        load_pairs(path)


def test_captions_files_not_in_utf8_are_named(folder):
    (folder / "captions.csv").write_bytes("file_name,safe_text,unsafe_text\np0.png,caf\xe9,x\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"captions.csv is not UTF-8 text: line 2"):
        load_folder(folder)


def test_nan_and_null_captions_of_a_csv_are_text_and_an_empty_cell_is_empty(tmp_path):
    rows = pair_rows(tmp_path, n=4)
    rows[0]["safe_text"], rows[1]["unsafe_text"], rows[2]["safe_text"] = "nan", "NaN", "null"
    data = load_pairs(write_pair_file(tmp_path / "pairs.csv", rows))
    assert data["safe_text"][:3] == ["nan", "a cat 1", "null"] and data["unsafe_text"][1] == "NaN"
    rows[3]["safe_text"] = ""
    with pytest.raises(ValueError, match=r"Column 'safe_text', row 3: the text is empty\."):
        load_pairs(write_pair_file(tmp_path / "pairs.csv", rows))


def test_pairs_whose_sides_are_identical_are_counted_and_refused_or_skipped(tmp_path):
    rows = pair_rows(tmp_path, n=4)
    rows[1]["unsafe_text"] = " a cat 1"
    rows[2]["unsafe_image"] = rows[2]["safe_image"]
    write_image(tmp_path / "img" / "copy.png", shade=3)
    rows[3]["unsafe_image"] = "img/copy.png"  # another file with the same bytes as img/s3.png
    path = write_pair_file(tmp_path / "pairs.csv", rows)
    with pytest.raises(ValueError, match=r"Column 'unsafe_text', row 1: the same text as safe_text .*"
                                         r"\(2 more bad row\(s\) after it\)"):
        load_pairs(path)
    with pytest.warns(SkippedRowsWarning, match="3 of 4 rows are bad") as caught:
        data = load_pairs(path, skip_bad_rows=True)
    assert data["safe_text"] == ["a cat 0"]
    report = next(w.message.report for w in caught if isinstance(w.message, SkippedRowsWarning))
    assert {(b.row, b.column) for b in report.bad} == {(1, "unsafe_text"), (2, "unsafe_image"), (3, "unsafe_image")}
    texts = {c: [r[c] for r in rows] for c in ("safe_text", "unsafe_text")}
    assert check_pairs(texts, columns_for(["text"])).bad_rows == [1]  # the images are not read for the text tower
